"""Images a task is scored on, when a dataset scores a task on a listed subset of its split.

A dataset declares such a subset with an attribute ``<task>_eval_ids`` (PASCAL-Context's
``edge_eval_ids``, read from ``data.edge_eval_list``: the literature scores edges on the 2498
``test_new`` images of the 5105 val images).
"""

from __future__ import annotations

from typing import Any

import lightning as L


def evaluation_dataset(trainer: L.Trainer) -> Any | None:
    """The dataset that validation and test read (the datamodule's ``val`` split), if known."""
    datamodule = getattr(trainer, "datamodule", None)
    return (getattr(datamodule, "datasets", None) or {}).get("val")


def scored_ids(dataset: Any | None, task: str) -> frozenset[str] | None:
    """Ids of ``dataset`` on which ``task`` is scored; None when every image is."""
    listed = getattr(dataset, f"{task}_eval_ids", None)
    if listed is None:
        return None
    listed = frozenset(str(i) for i in listed)
    every = getattr(dataset, "ids", None)
    if every is not None and listed.issuperset(str(i) for i in every):
        return None
    return listed
