"""Multi-Head Routing (Poly for h = 1), ScaLearn stage 2, Polyhistor hypernetwork adapters."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from mtl.checkpoint import CONFIG_KEY
from mtl.models.adapters import MHR, MTLoRA, Polyhistor, ScaLearn
from mtl.models.adapters.mhr import MHRLinear
from mtl.models.adapters.polyhistor import Hypernetwork, PolyhistorMlp, kron_expand
from mtl.models.adapters.task_batch import TaskBatch
from mtl.models.backbone import Backbone
from mtl.models.decoders import ConvDecoder
from mtl.models.multitask import MultiTaskModel

TASKS = {"semseg": 3, "depth": 1, "sal": 1}


def vit() -> Backbone:
    return Backbone(
        "vit_tiny_patch16_224",
        img_size=(32, 32),
        patch_size=8,
        depth=2,
        out_indices=[0, 1],
        dynamic_img_size=True,
    )


def build(adapter, tasks=TASKS) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(vit(), partial(ConvDecoder, hidden_channels=8), tasks, adapter)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomise(module: nn.Module, key: str) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if key in name:
                p.normal_(0, 0.05)


# ------------------------------------------------------------------------------ MHR
def test_mhr_with_one_head_is_poly():
    torch.manual_seed(0)
    batch = TaskBatch(["a", "b"])
    layer = MHRLinear(nn.Linear(6, 4), ["a", "b"], batch, skills=3, heads=1, rank=2, alpha=4.0)
    randomise(layer, "lora_")
    x = torch.randn(2 * 5, 6)  # T=2 tasks x 5 rows
    with batch.run(["a", "b"], 5):
        out = layer(x)
    for t, task in enumerate(["a", "b"]):  # Poly: one mixture of whole skills per task
        z = layer.lora_logits[task][0].sigmoid()
        w = z / z.sum()
        a = sum(w[s] * layer.lora_A[0, s] for s in range(3))  # d_in x r
        b = sum(w[s] * layer.lora_B[0, s] for s in range(3))  # r x d_out
        rows = x[t * 5 : (t + 1) * 5]
        torch.testing.assert_close(out[t * 5 : (t + 1) * 5], layer.base(rows) + 2.0 * rows @ a @ b)


def test_mhr_heads_route_slices_of_the_skills_separately():
    torch.manual_seed(0)
    batch = TaskBatch(["a"])
    layer = MHRLinear(nn.Linear(4, 6), ["a"], batch, skills=2, heads=2, rank=3, alpha=3.0)
    randomise(layer, "lora_")
    with torch.no_grad():  # head 0 takes skill 0 only, head 1 skill 1 only
        layer.lora_logits["a"].copy_(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]))
    a, b = layer.composed(["a"])
    torch.testing.assert_close(a[0, :2], layer.lora_A[0, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0, 2:], layer.lora_A[1, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(b[0, :, :3], layer.lora_B[0, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(b[0, :, 3:], layer.lora_B[1, 1], atol=1e-6, rtol=0)


def test_mhr_starts_as_the_base_model_and_trains_only_the_skills_and_routing():
    base = build(None).eval()
    net = build(MHR(skills=4, heads=2, rank=2, trainable=["norm"])).eval()
    with torch.no_grad():  # B starts at zero: every task's features are the base model's
        expected = base.backbone(images())
        for task in TASKS:
            for mine, theirs in zip(net.backbone(images(), [task]), expected, strict=True):
                torch.testing.assert_close(mine, theirs)
    for name, p in net.backbone.named_parameters():
        assert p.requires_grad == ("lora_" in name or "norm" in name), name
    own = net._backbone_task_parameters()["sal"]  # its routing logits: 2 blocks x 4 linears
    assert [tuple(p.shape) for p in own] == [(2, 4)] * 8


# ------------------------------------------------------------------------------ ScaLearn
def source_checkpoint(tmp_path) -> tuple[str, MultiTaskModel]:
    """A stage-1 model (per-task LoRA for semseg and depth) saved as train.py would."""
    adapter = MTLoRA(rank=2, alpha=4, task_rank=2, task_alpha=4, task_blocks=[0, 1])
    source = build(adapter, {"semseg": 3, "depth": 1})
    randomise(source, "lora_B")
    node = {"_target_": "mtl.models.adapters.MTLoRA", "rank": 2, "alpha": 4, "task_rank": 2}
    node.update(task_alpha=4, task_blocks=[0, 1], dropout=0.0)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    checkpoint = {
        "state_dict": state,
        CONFIG_KEY: {"model": {"adapter": node}, "data": {"tasks": ["semseg", "depth"]}},
    }
    torch.save(checkpoint, tmp_path / "source.ckpt")
    return str(tmp_path / "source.ckpt"), source.eval()


def test_scalearn_trains_only_omega_and_one_hot_omega_is_the_source_task(tmp_path):
    path, source = source_checkpoint(tmp_path)
    net = build(ScaLearn(source_ckpt=path), {"sal": 1}).eval()
    trainable = [n for n, p in net.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("scalearn_omega.sal" in n for n in trainable)
    omegas = [p for n, p in net.backbone.named_parameters() if "scalearn_omega" in n]
    assert len(omegas) == 6  # proj, fc1, fc2 of both blocks: N=2 sources x out width each
    with torch.no_grad():
        for omega in omegas:  # all weight on the first source task, semseg
            omega.copy_(torch.stack([torch.ones_like(omega[0]), torch.zeros_like(omega[1])]))
        expected = source.backbone(images(), ["semseg"])
        for mine, theirs in zip(net.backbone(images(), ["sal"]), expected, strict=True):
            torch.testing.assert_close(mine, theirs)
    net.train()
    loss = sum(f.sum() for f in net.backbone(images(), ["sal"]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in omegas)


def test_scalearn_experiment_runs_on_a_stage_one_checkpoint(make_cfg, tmp_path):
    from mtl.redact import resolved_config
    from mtl.train import build_module, train

    stage1 = make_cfg("experiment=synthetic_vit_tiny_mtlora_equal", "data.tasks=[semseg,depth]")
    module = build_module(stage1)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": module.state_dict(), CONFIG_KEY: resolved_config(stage1)}, path)
    cfg = make_cfg(
        "experiment=synthetic_vit_tiny_scalearn_equal",
        f"model.adapter.source_ckpt={path}",
        "debug=fdr",
    )
    scores = train(cfg)
    assert "val/sal/maxF" in scores and "val/semseg/loss" not in scores
    assert scores["params/trainable"] < 0.2 * scores["params/total"]


def test_scalearn_shared_scalar_omega_and_a_missing_source(tmp_path):
    path, _ = source_checkpoint(tmp_path)
    net = build(ScaLearn(source_ckpt=path, vector=False, shared=True), {"sal": 1})
    omegas = [p for n, p in net.backbone.named_parameters() if "scalearn_omega" in n]
    assert [tuple(p.shape) for p in omegas] == [(2,)]  # one scalar per source, all layers
    problems = ScaLearn(source_ckpt=str(tmp_path / "nope.ckpt")).problems(nn.Linear(1, 1), [])
    assert problems == [f"model.adapter.source_ckpt: no checkpoint file at {tmp_path}/nope.ckpt"]
    assert copy.deepcopy(net)  # the hooks and shared omega survive a copy


# ------------------------------------------------------------------------------ Polyhistor
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


def test_kron_expand_is_the_kronecker_product():
    kernel, template = torch.randn(3, 2), torch.randn(4, 5)
    torch.testing.assert_close(kron_expand(template, kernel), torch.kron(kernel, template))
    batched = kron_expand(torch.stack([template, 2 * template]), kernel)
    torch.testing.assert_close(batched[1], torch.kron(kernel, 2 * template))


@pytest.mark.parametrize("lite", [False, True])
def test_polyhistor_weights_per_stage_start_as_the_base_model_and_only_adapters_train(lite):
    torch.manual_seed(0)
    base = swin().eval()
    adapted = copy.deepcopy(base)
    adapted.adapt(Polyhistor(rank=4, hyper_rank=2, embed_dim=8, lite=lite), list(TASKS))
    layers = [m for m in adapted.modules() if isinstance(m, PolyhistorMlp)]
    shapes = []
    for layer in layers:
        down, up = layer.weights(["semseg", "sal"])
        shapes.append((tuple(down.shape), tuple(up.shape)))
    widths = [24, 48, 96, 96, 192]  # Swin stages 1..4 (stage 3 has two blocks)
    assert shapes == [((2, w, 4), (2, 4, w)) for w in widths]
    assert [tuple(m.polyhistor_kernel_down.shape) for m in layers] == [(w // 24, 1) for w in widths]
    with torch.no_grad():
        for task in TASKS:
            for mine, theirs in zip(adapted(images(), [task]), base(images()), strict=True):
                torch.testing.assert_close(mine, theirs)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("polyhistor_" in n for n in trainable)
    hyper = [m for m in adapted.modules() if isinstance(m, Hypernetwork)]
    assert len(hyper) == 1  # one hypernetwork, shared by every layer, counted once


def test_polyhistor_lite_is_smaller_and_both_learn_on_vit():
    counts = {}
    for lite in (False, True):
        net = build(Polyhistor(rank=8, hyper_rank=4, embed_dim=16, lite=lite)).train()
        params = [p for p in net.backbone.parameters() if p.requires_grad]
        counts[lite] = sum(p.numel() for p in params)
        optimiser = torch.optim.Adam(params, lr=1e-2)
        target = torch.randn(2, 192, 4, 4, generator=torch.Generator().manual_seed(3))
        losses = []
        for _ in range(5):
            loss = sum((f - target).pow(2).mean() for f in net.backbone(images(), ["depth"]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0]
    assert counts[True] < counts[False]
