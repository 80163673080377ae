"""Adapters: LoRA, MTLoRA (the task batch), MoE (grouped experts, routing, balancing loss)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtl.config import ConfigError, validate_config
from mtl.models.adapters import LoRA, LoRALinear, MoE, MoEMlp, MTLoRA, TaskLoRALinear
from mtl.models.adapters.lora import replace_module
from mtl.models.adapters.moe import ExpertMLPs
from mtl.models.adapters.task_batch import TaskBatch
from mtl.models.backbone import Backbone
from mtl.models.decoders import ConvDecoder
from mtl.models.multitask import MultiTaskModel
from mtl.train import train

TASKS = {"semseg": 3, "depth": 1, "sal": 1}


def vit(depth: int = 4) -> Backbone:
    return Backbone(
        "vit_tiny_patch16_224",
        img_size=(32, 32),
        patch_size=8,
        depth=depth,
        out_indices=[1, 3],
        dynamic_img_size=True,
    )


def swin() -> Backbone:
    return Backbone(
        "swin_tiny_patch4_window7_224",
        img_size=(32, 32),
        window_size=2,
        depths=(1, 1, 2, 1),
        embed_dim=24,
        num_heads=(1, 2, 2, 4),
        out_indices=[0, 1, 2, 3],
    )


def model(backbone: Backbone, adapter) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(backbone, partial(ConvDecoder, hidden_channels=8), TASKS, adapter)


def randomise_lora(module: nn.Module) -> None:
    """LoRA B starts at zero (a no-op); give every B values so the adapters matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("make", [vit, swin])
def test_lora_starts_as_the_base_model_and_freezes_it(make, images):
    torch.manual_seed(0)
    base = make().eval()
    adapted = copy.deepcopy(base)
    adapted.adapt(LoRA(rank=4, alpha=8, trainable=["norm"]), list(TASKS))
    assert any(isinstance(m, LoRALinear) for m in adapted.modules())
    for a, b in zip(base(images), adapted(images), strict=True):
        torch.testing.assert_close(a, b)
    for name, p in adapted.named_parameters():
        assert p.requires_grad == ("lora_" in name or "norm" in name), name
    wrapped = [n for n, m in adapted.named_modules() if isinstance(m, LoRALinear)]
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in wrapped} == {
        "attn.qkv",
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
    }


def test_lora_merge_equals_unmerged_and_unmerge_restores(images):
    net = vit()
    net.adapt(LoRA(rank=4, alpha=8, dropout=0.1), list(TASKS))
    net.eval()
    randomise_lora(net)
    weights = {n: p.clone() for n, p in net.named_parameters() if "base.weight" in n}
    before = net(images)
    layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.merge()
    for a, b in zip(before, net(images), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for m in layers:
        m.unmerge()
    for n, p in net.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ MTLoRA
class FixedTaskLoRA(nn.Module):
    """One task's pair of a `TaskLoRALinear`, applied to every row (the reference)."""

    def __init__(self, layer: TaskLoRALinear, task: str) -> None:
        super().__init__()
        self.layer, self.task = layer, task

    def forward(self, x):
        a, b = self.layer.lora_A[self.task], self.layer.lora_B[self.task]
        return self.layer.base(x) + self.layer.scale * x @ a.T @ b.T


@pytest.mark.parametrize("make", [vit, swin])
def test_mtlora_task_batch_equals_each_task_run_with_its_own_lora(make, images):
    net = model(make(), MTLoRA(rank=4, alpha=8, task_rank=2, task_alpha=4)).eval()
    randomise_lora(net)
    together = net(images)
    for task in TASKS:
        alone = copy.deepcopy(net)
        for name, m in list(alone.backbone.named_modules()):
            if isinstance(m, TaskLoRALinear):
                replace_module(alone.backbone, name, FixedTaskLoRA(m, task))
        torch.testing.assert_close(
            alone(images, [task])[task], together[task], atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(net(images, [task])[task], together[task], atol=1e-5, rtol=1e-4)


def test_mtlora_blocks_before_the_first_task_block_run_once(images):
    net = model(vit(), MTLoRA(rank=4, alpha=8, task_blocks=[2, 3])).eval()
    rows = {}
    for i, block in enumerate(net.backbone.model.model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: rows.__setitem__(i, out.shape[0]))
    net(images)
    assert rows == {0: 2, 1: 2, 2: 6, 3: 6}


def _grads_after_single_task_step(net: MultiTaskModel, images, task: str) -> None:
    net.zero_grad(set_to_none=True)
    net(images, [task])[task].square().mean().backward()


@pytest.mark.parametrize(
    "adapter",
    [
        MTLoRA(rank=4, alpha=8),
        MoE(num_experts=4, top_k=2),
        MoE(num_experts=4, top_k=2, router="shared"),
    ],
    ids=["mtlora", "moe", "moe-shared-router"],
)
def test_single_task_forward_touches_only_that_tasks_parameters(adapter, images):
    net = model(vit(), adapter).train()
    randomise_lora(net)
    assert net.task_aware_backbone
    own = net.task_parameters()
    shared = net.shared_parameters()
    trainable = [p for p in net.parameters() if p.requires_grad]
    ids = [id(p) for p in shared] + [id(p) for ps in own.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in trainable)  # a partition
    assert all(len(own[t]) > len(list(net.decoders[t].parameters())) for t in TASKS)
    _grads_after_single_task_step(net, images, "depth")
    for task, params in own.items():
        used = [p.grad is not None for p in params]
        assert all(used) if task == "depth" else not any(used), task
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(images, ["depth"])["depth"], net(images)["depth"])


# ------------------------------------------------------------------------------ MoE
def test_grouped_experts_equal_a_dense_reference():
    torch.manual_seed(0)
    experts = ExpertMLPs(num_experts=5, dim=6, hidden=7, act=nn.GELU())
    x = torch.randn(11, 6)
    idx = torch.stack([torch.randperm(5)[:3] for _ in range(11)])
    gates = torch.rand(11, 3)
    dense = torch.zeros_like(x)
    for n in range(11):
        for j in range(3):
            e = idx[n, j]
            h = nn.functional.gelu(x[n] @ experts.moe_w1[e].T + experts.moe_b1[e])
            dense[n] += gates[n, j] * (h @ experts.moe_w2[e].T + experts.moe_b2[e])
    torch.testing.assert_close(experts(x, idx, gates), dense)


def test_experts_start_from_the_mlp_chunks():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
    experts = ExpertMLPs(num_experts=3, dim=4, hidden=4, act=nn.GELU())
    experts.init_from(fc1, fc2)
    torch.testing.assert_close(experts.moe_w1[2], fc1.weight[:4])  # expert 2: chunk 0
    torch.testing.assert_close(experts.moe_w2[1], fc2.weight[:, 4:])


def test_routing_gates_and_balancing_loss_match_a_hand_computation():
    batch = TaskBatch(["a", "b"])
    layer = MoEMlp(
        2,
        3,
        num_experts=3,
        top_k=1,
        tasks=["a", "b"],
        task_batch=batch,
        act=nn.GELU(),
        noise_std=1.0,
    ).eval()
    with torch.no_grad():
        layer.router.moe_router["a"].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]])  # 1 image, 4 tokens
    with batch.run(["a"], 1):
        experts, gates = layer.route(tokens)
    # logits per token: (2,0,0) (0,2,0) (3,0,0) (0,0,0); softmax, top-1 kept, not renormalised
    e2, e3 = torch.e**2, torch.e**3
    p = [e2 / (e2 + 2), e2 / (e2 + 2), e3 / (e3 + 2), 1 / 3]
    assert experts[0, :, 0].tolist() == [0, 1, 0, 0]  # the tie goes to the first expert
    torch.testing.assert_close(gates[0, :, 0], torch.tensor(p))
    importance = [p[0] + p[2] + p[3], p[1], 0.0]
    load = [3.0, 1.0, 0.0]

    def cv2(v):
        mean = sum(v) / len(v)
        return sum((x - mean) ** 2 for x in v) / (len(v) - 1) / mean**2

    expected = cv2(importance) + cv2(load)
    torch.testing.assert_close(
        layer.balance_loss["a"], torch.tensor(expected), rtol=1e-5, atol=1e-6
    )
    assert layer.load.tolist() == [[3, 1, 0]]


def test_moe_auxiliary_losses_are_per_task_and_weighted(images):
    net = model(vit(), MoE(num_experts=4, top_k=2, balance_weight=0.5)).train()
    net(images)
    aux = net.auxiliary_losses()
    assert set(aux) == set(TASKS) and all(v.requires_grad and v > 0 for v in aux.values())
    layers = [m for m in net.modules() if isinstance(m, MoEMlp)]
    assert len(layers) == 2  # blocks 1 and 3
    torch.testing.assert_close(aux["sal"], 0.5 * sum(m.balance_loss["sal"] for m in layers))
    stats = net.routing_statistics()
    shares = [v for k, v in stats.items() if k.startswith("moe/layer0/semseg/expert")]
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
    net(images, ["depth"])
    assert set(net.auxiliary_losses()) == {"depth"}


def flops(net: nn.Module, images, tasks=None) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(images, tasks)
    return counter.get_total_flops()


def test_moe_flops_fall_for_one_task_and_grow_linearly_with_k(images):
    all_tasks = {}
    for k in (1, 2, 3, 4):
        net = model(vit(), MoE(num_experts=4, top_k=k)).eval()
        all_tasks[k] = flops(net.backbone, images)
        if k == 2:
            assert flops(net.backbone, images, ["depth"]) < all_tasks[k] / 2
    steps = [all_tasks[k + 1] - all_tasks[k] for k in (1, 2, 3)]
    assert steps[0] > 0 and steps[0] == steps[1] == steps[2]  # only the routed tokens compute
    dense = model(vit(), None).eval()
    # experts with hidden = dim = mlp_hidden / 4: top-4 costs what the dense MLP costs
    mlp_cost = flops(dense.backbone, images)
    assert all_tasks[4] > mlp_cost and all_tasks[1] < all_tasks[4]


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["lora", "mtlora", "moe"])
def test_every_adapter_trains_through_lightning(make_cfg, name):
    scores = train(make_cfg(f"experiment=synthetic_vit_tiny_{name}_equal", "debug=fdr"))
    assert "val/semseg/mIoU" in scores
    if name != "moe":
        assert scores["params/trainable"] < scores["params/total"]


def test_adapter_config_problems_are_reported_together(make_cfg):
    cfg = make_cfg("model/adapter=moe", "model.adapter.top_k=20", "debug=fdr")
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    assert "model.adapter.top_k: 20; expected 1..num_experts (16)" in message
    assert "model.adapter: moe needs a plain ViT backbone" in message

    cfg = make_cfg(
        "experiment=synthetic_vit_tiny_mtlora_equal",
        "model.adapter.rank=0",
        "model.adapter.task_aware=false",
        "balancer.mode=rep",
        "balancer=mgda",
    )
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    assert "model.adapter.rank: 0; expected a positive integer" in message
    assert "model.adapter.task_aware: False; MTLoRA is task-aware" in message

    cfg = make_cfg("model/adapter=lora", "model.adapter.targets=[qkv]")
    with pytest.raises(ConfigError, match="model.adapter.targets: \\[qkv\\] match no linear"):
        validate_config(cfg)


def test_rep_mode_is_refused_for_a_task_aware_adapter(make_cfg):
    cfg = make_cfg("experiment=synthetic_vit_tiny_moe_equal", "balancer=mgda", "balancer.mode=rep")
    with pytest.raises(ConfigError, match="balancer.mode: 'rep' needs one shared representation"):
        validate_config(cfg)
