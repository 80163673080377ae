"""Merge single-task models: ``python -m mtl.merge method=ties checkpoints=[a.ckpt,b.ckpt]``.

Composes ``conf/merge.yaml`` with one method of ``conf/merge/`` (``method=NAME``; its keys as
``method.KEY=VALUE``) and runs `mtl.merging.run.merge`: ``<output_dir>/merged.ckpt`` (for
``eval.py``, ``predict.py`` and ``mtl.load``), ``metrics.json`` and ``baselines.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mtl.cli import reporting_errors
from mtl.merging.task_vectors import MergeError

#: conf/ of the checkout the command runs in, else the package's own.
CONFIG_PATH = (
    str(Path.cwd() / "conf")
    if (Path.cwd() / "conf" / "merge.yaml").is_file()
    else str(Path(__file__).resolve().parents[1] / "conf")
)


def method_overrides(argv: list[str]) -> list[str]:
    """``method=NAME`` (one choice of the ``merge`` config group, placed at ``method``) as
    Hydra spells it: ``merge@method=NAME``."""
    return [f"merge@{word}" if word.startswith("method=") else word for word in argv]


def run(cfg: DictConfig) -> dict[str, float | str]:
    """`mtl.merging.run.merge`, a user's mistake reported as one ``error:`` line."""
    from mtl.merging.run import merge

    return reporting_errors(lambda: merge(cfg), extra=(MergeError,))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="merge")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = method_overrides(sys.argv[1:])
    main()
