"""Targets computed in the loader workers from another task's target after the transform
(e.g. semantic boundaries from the augmented class map: ``mtl.data.boundaries``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

Sample = dict[str, Any]


class DerivedTargets:
    """Run `transform`, then add ``sample[name] = derive(sample[source])`` for each
    ``name: (source, derive)`` of `derived` and remove the keys in `drop` (sources loaded only
    to derive from). Picklable when the callables are (module-level functions, partials)."""

    def __init__(
        self,
        transform: Callable[[Sample], Sample] | None,
        derived: Mapping[str, tuple[str, Callable[[Tensor], Tensor]]],
        drop: Sequence[str] = (),
    ) -> None:
        self.transform = transform
        self.derived = dict(derived)
        self.drop = tuple(drop)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(self.transform(sample) if self.transform is not None else sample)
        for name, (source, derive) in self.derived.items():
            out[name] = derive(out[source])
        for key in self.drop:
            out.pop(key, None)
        return out

    def __repr__(self) -> str:
        made = ", ".join(f"{name} <- {source}" for name, (source, _) in self.derived.items())
        return f"DerivedTargets({self.transform!r}; {made}; drop {list(self.drop)})"
