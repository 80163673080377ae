"""Backbone adapters (``conf/model/adapter``): none, lora, mtlora, moe, modsquad, mhr,
scalearn, polyhistor (and polyhistor_lite)."""

from mtl.models.adapters.base import Adapter, NoAdapter
from mtl.models.adapters.lora import LoRALinear, TaskLoRALinear
from mtl.models.adapters.mhr import MHR
from mtl.models.adapters.modsquad import ModSquad
from mtl.models.adapters.moe import MoE, MoEMlp
from mtl.models.adapters.mtlora import MTLoRA
from mtl.models.adapters.polyhistor import Polyhistor
from mtl.models.adapters.scalearn import ScaLearn
from mtl.models.adapters.shared_lora import LoRA
from mtl.models.adapters.task_batch import TaskBatch

__all__ = [
    "Adapter",
    "LoRA",
    "LoRALinear",
    "MHR",
    "MTLoRA",
    "ModSquad",
    "MoE",
    "MoEMlp",
    "NoAdapter",
    "Polyhistor",
    "ScaLearn",
    "TaskBatch",
    "TaskLoRALinear",
]
