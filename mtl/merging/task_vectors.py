"""Task vectors: the state-dict arithmetic every merging method shares.

A state dict here is a plain ``{name: tensor}`` of the tensors that are merged (the shared
encoder's parameters); a task vector is ``finetuned - base`` over the same names. "Global"
operations look at one task's whole vector flattened in name order, "per tensor" ones at each
tensor alone. No library offers these for arbitrary (timm) state dicts without pulling in its
own model pools, hence written here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


class MergeError(ValueError):
    """Checkpoints or settings that cannot be merged; the message names the key or tensor."""


def first_difference(reference: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> str | None:
    """The first tensor (in `reference`'s order) whose name, shape or dtype differs between the
    two state dicts, described in words; None when they have the same architecture."""
    for name, tensor in reference.items():
        if name not in other:
            return f"{name} is missing"
        if tuple(other[name].shape) != tuple(tensor.shape):
            return f"{name} has shape {tuple(other[name].shape)}, expected {tuple(tensor.shape)}"
        if other[name].dtype != tensor.dtype:
            return f"{name} has dtype {other[name].dtype}, expected {tensor.dtype}"
    extra = [name for name in other if name not in reference]
    return f"{extra[0]} is not in the first state dict" if extra else None


def task_vector(finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> StateDict:
    """τ = θ_t − θ₀, in float32 (the arithmetic of every method)."""
    return {k: finetuned[k].float() - base[k].float() for k in base}


def add(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], scale: float = 1.0) -> StateDict:
    """θ₀ + scale·δ, in the dtype of `base`."""
    return {k: (base[k].float() + scale * delta[k]).to(base[k].dtype) for k in base}


def scale(vector: Mapping[str, Tensor], factor: float) -> StateDict:
    return {k: factor * v for k, v in vector.items()}


def total(vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Σ_t τ_t."""
    return {k: torch.stack([v[k] for v in vectors]).sum(0) for k in vectors[0]}


def flatten(vector: Mapping[str, Tensor]) -> Tensor:
    """One task vector as a 1-D tensor, tensors in the dict's order."""
    return torch.cat([v.reshape(-1) for v in vector.values()])


def stack(vectors: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """T task vectors as a [T, D] matrix (one flattened vector per row)."""
    return torch.stack([flatten(v) for v in vectors])


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> StateDict:
    """A 1-D tensor (or [T, D] rows) back into tensors shaped like `like`."""
    out, start = {}, 0
    for name, tensor in like.items():
        n = tensor.numel()
        out[name] = flat[..., start : start + n].reshape(*flat.shape[:-1], *tensor.shape)
        start += n
    return out


def count(fraction: float, n: int) -> int:
    """⌊fraction·n⌋, robust to float rounding (0.1·10 is 1, not 0)."""
    return int(fraction * n + 1e-6)


def top_magnitude_mask(x: Tensor, fraction: float) -> Tensor:
    """Along the last axis, True for the ``int(d·fraction)`` entries of largest magnitude
    (equal magnitudes at the threshold are all kept). The original TIES code and FusionBench
    compare with the (d − ⌊d·k⌋)-th smallest magnitude and so keep one entry more."""
    if not 0.0 <= fraction <= 1.0:
        raise MergeError(f"fraction to keep: {fraction}; expected a value in [0, 1]")
    d = x.shape[-1]
    keep = count(fraction, d)
    if keep >= d:
        return torch.ones_like(x, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    magnitude = x.abs()
    threshold = magnitude.kthvalue(d - keep + 1, dim=-1, keepdim=True).values
    return magnitude >= threshold


def trim(vectors: Sequence[Mapping[str, Tensor]], fraction: float, scope: str) -> list[StateDict]:
    """Each task vector with all but its top `fraction` magnitudes zeroed, ranked over the
    whole vector (``scope="global"``) or within each tensor (``"tensor"``)."""
    if scope == "global":
        rows = stack(vectors)
        kept = rows * top_magnitude_mask(rows, fraction)
        return [unflatten(row, vectors[0]) for row in kept]
    if scope == "tensor":
        return [
            {
                k: v * top_magnitude_mask(v.reshape(-1), fraction).reshape(v.shape)
                for k, v in tv.items()
            }
            for tv in vectors
        ]
    raise MergeError(f"trim: '{scope}'; expected 'global' or 'tensor'")
