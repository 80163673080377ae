"""Config checks of ``model.adapter`` against ``model.backbone``, before anything is built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class

from mtl.models.adapters.base import Adapter


def adapter_problems(adapter: Mapping[str, Any], backbone: Mapping[str, Any]) -> list[str]:
    """Every problem of the (resolved) adapter node for the (resolved) backbone node; the
    backbone is built on the meta device, so this allocates no weights."""
    from mtl.models.backbone import meta_backbone  # here: the backbone module imports this package

    target = adapter.get("_target_")
    try:
        cls = get_class(target)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"model.adapter._target_: cannot import '{target}' ({error})"]
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        return [f"model.adapter._target_: '{target}' is not an adapter (mtl.models.adapters)"]
    kwargs = {k: v for k, v in adapter.items() if not k.startswith("_")}
    problems = []
    if kwargs.get("task_aware", False) != cls.task_aware:
        problems.append(
            f"model.adapter.task_aware: {kwargs.get('task_aware', False)!r}; {cls.__name__} "
            f"is {'' if cls.task_aware else 'not '}task-aware, set it to {cls.task_aware}"
        )
    kwargs["task_aware"] = cls.task_aware
    try:
        spec = cls(**kwargs)
    except TypeError as error:
        return [*problems, f"model.adapter: {error}"]
    if type(spec).problems is Adapter.problems:
        return problems  # nothing depends on the backbone
    model = meta_backbone(backbone)
    if model is None:
        return problems
    return problems + spec.problems(model.model, model.taps)
