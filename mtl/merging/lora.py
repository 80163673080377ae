"""LoRA task vectors: a single-task run trained with ``model/adapter=lora`` keeps each adapted
linear's base weight W₀ frozen and learns a pair (A, B); its weight is W₀ + (α/r)·B·A.

Merging works on the dense deltas ΔW = (α/r)·B·A: TIES's sign election, trimming and every mask
are defined entry-wise on the dense weight, not on the factors (the sum of two tasks' factors
is not the factor of any sum). `fold_lora` turns such a state dict into the plain model's
(the names it has with ``model/adapter=none``), the LoRA folded into each base weight, so the
run enters merging like a fully fine-tuned one and the merged checkpoint is dense.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mtl.merging.task_vectors import MergeError, StateDict

LORA_A, LORA_B = ".lora_A", ".lora_B"
#: The wrapped linear inside a `LoRALinear` (``<layer>.base.weight``).
WRAPPED = ".base."


def fold_lora(state: Mapping[str, Tensor], scale: float) -> StateDict:
    """`state` of a model with shared `LoRALinear` layers as the plain model's state: each
    ``<layer>.base.<p>`` renamed ``<layer>.<p>``, ``scale · B @ A`` added to ``<layer>.weight``
    (computed in float64, stored in the weight's dtype), the pairs dropped."""
    layers = [name[: -len(LORA_A)] for name in state if name.endswith(LORA_A)]
    out: StateDict = {}
    for name, value in state.items():
        if name.endswith((LORA_A, LORA_B)):
            continue
        layer = next((p for p in layers if name.startswith(p + WRAPPED)), None)
        out[name if layer is None else layer + "." + name[len(layer + WRAPPED) :]] = value
    for layer in layers:
        a, b, weight = state[layer + LORA_A], state.get(layer + LORA_B), out.get(layer + ".weight")
        if b is None or weight is None or weight.shape != (b.shape[0], a.shape[1]):
            raise MergeError(f"{layer}: not a LoRA layer (lora_A, lora_B and base.weight)")
        delta = scale * (b.double() @ a.double())
        out[layer + ".weight"] = (weight.double() + delta).to(weight.dtype)
    return out


def lora_scale(adapter: Mapping) -> float:
    """α / r of a ``model/adapter=lora`` config node, the factor of B·A."""
    return float(adapter["alpha"]) / int(adapter["rank"])

