"""Slimmable widths (mtl/slim): layers, models, training step, search, export, config checks."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from mtl.models.backbone import Backbone
from mtl.models.decoders import ConvDecoder, HRNetDecoder
from mtl.models.multitask import MultiTaskModel
from mtl.slim import (
    SlimBatchNorm2d,
    SlimConv2d,
    SlimDim,
    SlimGroupNorm,
    SlimLinear,
    Slimming,
    at_widths,
    export_dense,
)
from mtl.slim.cost import CostTable, cost_table, count_flops
from mtl.slim.search import SearchError, search
from mtl.slim.training import SandwichStep


def test_slim_linear_is_the_layer_at_full_width_and_a_dense_layer_of_its_first_channels():
    torch.manual_seed(0)
    base = nn.Linear(6, 12)  # output: 3 groups (q, k, v) of 2 heads of 2 channels
    x = torch.randn(5, 6)
    slim = SlimLinear(copy.deepcopy(base), "encoder", None, SlimDim(12, 3, 2))
    assert torch.equal(slim(x), base(x))
    slim.width = 0.5  # one head of each group: rows 0-1, 4-5, 8-9
    rows = torch.tensor([0, 1, 4, 5, 8, 9])
    dense = nn.Linear(6, 6)
    dense.weight.data, dense.bias.data = base.weight[rows], base.bias[rows]
    assert torch.allclose(slim(x), dense(x))
    assert torch.allclose(slim.dense()(x), dense(x))
    proj = SlimLinear(nn.Linear(8, 3), "encoder", SlimDim(8, 1, 2), None)
    proj.width = 0.3  # ceil(0.3 * 4 units) = 2 units of 2 channels: columns 0-3
    assert proj.dense().weight.shape == (3, 4)
    z = torch.randn(2, 4)
    assert torch.allclose(proj(z), z @ proj.weight[:, :4].T + proj.bias)


def test_slim_conv_and_norms_equal_dense_layers_built_from_the_first_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)  # input: 2 concatenated maps of 4 channels
    slim = SlimConv2d(copy.deepcopy(conv), "semseg", SlimDim(8, 2, 1), SlimDim(4))
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(slim(x), conv(x))
    slim.width = 0.5
    keep_in = torch.tensor([0, 1, 4, 5])
    dense = nn.Conv2d(4, 2, 3, padding=1)
    dense.weight.data = conv.weight[:2][:, keep_in]
    dense.bias.data = conv.bias[:2]
    assert torch.allclose(slim(x[:, keep_in]), dense(x[:, keep_in]), atol=1e-6)

    group = nn.GroupNorm(4, 8)  # groups of 2 channels
    nn.init.normal_(group.weight)
    slim_group = SlimGroupNorm(copy.deepcopy(group), "semseg", SlimDim(8, 1, 2))
    h = torch.randn(2, 8, 3, 3)
    assert torch.equal(slim_group(h), group(h))
    slim_group.width = 0.5
    small = nn.GroupNorm(2, 4)
    small.weight.data, small.bias.data = group.weight[:4], group.bias[:4]
    assert torch.allclose(slim_group(h[:, :4]), small(h[:, :4]), atol=1e-6)
    assert torch.allclose(slim_group.dense()(h[:, :4]), small(h[:, :4]), atol=1e-6)

    batch = nn.BatchNorm2d(8).eval()
    batch.running_mean.normal_()
    slim_batch = SlimBatchNorm2d(copy.deepcopy(batch), "semseg", SlimDim(8), [0.5, 1.0]).eval()
    assert torch.equal(slim_batch(h), batch(h))
    slim_batch.width = 0.5  # its own statistics (switchable): fresh ones here
    assert torch.allclose(slim_batch(h[:, :4]), h[:, :4] / (1 + 1e-5) ** 0.5, atol=1e-6)
    slim_batch.width = 0.25
    with pytest.raises(ValueError, match="not one of the trained widths"):
        slim_batch(h[:, :2])


def _vit(decoder=HRNetDecoder, norm="batch") -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = Backbone(
        "vit_tiny_patch16_224",
        img_size=(32, 32),
        patch_size=8,
        depth=2,
        num_heads=4,
        out_indices=[0, 1],
        dynamic_img_size=True,
    )
    head = partial(decoder, hidden_channels=16, norm=norm)
    return MultiTaskModel(backbone, head, {"semseg": 5, "depth": 1}).eval()


@pytest.mark.parametrize(
    "build", [_vit, lambda: _vit(ConvDecoder, "group")], ids=["vit_hrnet_bn", "vit_conv_gn"]
)
def test_slim_model_full_width_equals_plain_and_export_is_smaller_and_equal(build):
    plain = build()
    model = copy.deepcopy(plain)
    Slimming().apply(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, full = plain(x), model(x)
    assert all(torch.equal(expected[t], full[t]) for t in expected)

    widths = {"encoder": 0.5, "semseg": 0.25, "depth": 0.75}
    with torch.no_grad(), at_widths(model, widths):
        masked = model(x)
        masked_flops = count_flops(lambda: model(x))
    small = export_dense(copy.deepcopy(model), widths).eval()
    with torch.no_grad():
        exported = small(x)
    assert all(torch.allclose(masked[t], exported[t], atol=1e-5) for t in masked)
    assert count_flops(lambda: small(x)) == masked_flops
    params = sum(p.numel() for p in small.parameters())
    assert params < 0.75 * sum(p.numel() for p in plain.parameters())
    assert small.backbone.model.model.blocks[0].attn.num_heads == 2  # heads halve

    table = cost_table(model, (32, 32), [0.25, 0.5, 0.75, 1.0])
    assert 2 * table.flops(widths) == masked_flops  # exact and additive (per image)
    assert table.full == count_flops(lambda: plain(x[:1]))
    for costs in [table.encoder, *table.decoders.values()]:
        values = [costs[str(w)] for w in (0.25, 0.5, 0.75, 1.0)]
        assert values == sorted(values) and len(set(values)) == 4  # falls with width


def test_resnet_blocks_are_slimmed():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", out_indices=[1, 2])
    model = MultiTaskModel(backbone, partial(ConvDecoder, hidden_channels=8), {"depth": 1})
    plain = copy.deepcopy(model).eval()
    Slimming(widths=[0.5, 1.0]).apply(model)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["depth"], plain(x)["depth"])
        with at_widths(model, {"encoder": 0.5}):
            half = count_flops(lambda: model(x))
    assert half < 0.6 * count_flops(lambda: plain(x))


def test_sandwich_step_sums_the_subnetworks_losses_and_distils_the_encoder_only():
    model = _vit()
    Slimming(random_configs=1, distill_weight=2.0).apply(model)
    model.train()
    slimming = Slimming(random_configs=1, distill_weight=2.0)
    step = SandwichStep(slimming, model, seed=3)
    assert step.configs[0] == {"encoder": 0.25, "semseg": 0.25, "depth": 0.25}
    assert step.configs == SandwichStep(slimming, model, seed=3).configs  # same on every rank
    x = torch.randn(2, 3, 32, 32)

    def loss_fn(preds, batch, tasks):
        return {t: preds[t].square().mean() for t in tasks}

    torch.manual_seed(1)
    full = model.decode(x)
    losses = loss_fn(full.preds, None, model.tasks)
    total = step.add_subnetworks(model, losses, full.features, {"image": x}, model.tasks, loss_fn)
    expected = {t: losses[t].item() for t in losses}
    distill = 0.0
    for config in step.configs:
        with torch.no_grad(), at_widths(model, config):
            out = model.decode(x)
        for t in expected:
            expected[t] += out.preds[t].square().mean().item()
        distill += sum(
            ((f - g).square().mean() / g.square().mean()).item()
            for f, g in zip(out.features, full.features, strict=True)
        ) / len(full.features)
    assert {t: round(v.item(), 4) for t, v in total.items()} == {
        t: round(v, 4) for t, v in expected.items()
    }
    assert step.distill.item() == pytest.approx(2.0 * distill, rel=1e-4)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = dict(zip(names, step.distill_gradients(list(params)), strict=True))
    assert all(g is None for n, g in grads.items() if n.startswith("decoders."))
    assert grads["backbone.model.model.blocks.0.mlp.fc1.weight"].abs().sum() > 0


def test_search_follows_the_budget_and_the_preference():
    table = CostTable(
        [32, 32],
        [0.5, 1.0],
        encoder={"0.5": 50, "1.0": 100},
        decoders={"a": {"0.5": 10, "1.0": 20}, "b": {"0.5": 10, "1.0": 20}},
    )  # full: 140
    assert search(table, 1.0).widths == {"encoder": 1.0, "a": 1.0, "b": 1.0}
    assert search(table, 0.65, {"a": 3, "b": 1}).widths == {"encoder": 0.5, "a": 1.0, "b": 1.0}
    chosen = search(table, 0.6, {"a": 3, "b": 1})  # 84 FLOPs: one decoder can be wide
    assert chosen.widths == {"encoder": 0.5, "a": 1.0, "b": 0.5}
    assert (chosen.flops, chosen.fraction) == (80, 80 / 140)
    assert search(table, 0.6, {"a": 1, "b": 3}).widths == {"encoder": 0.5, "a": 0.5, "b": 1.0}
    assert search(table, 0.6).widths == {"encoder": 0.5, "a": 0.5, "b": 0.5}  # equal: equal widths
    with pytest.raises(SearchError, match="budget >= 0.500"):
        search(table, 0.4)
    with pytest.raises(SearchError, match="unknown tasks"):
        search(table, 0.6, {"c": 1})
    with pytest.raises(SearchError, match=r"\(0, 1\]"):
        search(table, 1.5)


def test_config_refuses_what_slimming_cannot_do(make_cfg):
    from mtl.config import config_problems

    cfg = make_cfg(
        "model/slim=on", "model/backbone=swin_tiny", "model/adapter=lora", "model.slim.widths=[.5]"
    )
    assert [p for p in config_problems(cfg) if "slim" in p] == [
        "model.slim.widths: [0.5]; expected widths in (0, 1] including 1.0",
        "model.adapter: LoRA cannot be combined with model/slim=on (slimming replaces the "
        "layers adapters modify); use model/adapter=none",
        "model.backbone: FeatureListNet cannot be slimmed (model/slim=on); supported: timm "
        "ViTs (MLP hidden size, attention heads) and ResNets (block width) "
        "(swin_tiny_patch4_window7_224)",
    ]
    assert config_problems(make_cfg("model/slim=on", "model.slim.fixed={semseg:0.3}")) == [
        "model.slim.fixed: {'semseg': 0.3}; every width must be one of model.slim.widths"
    ]
    assert config_problems(make_cfg("model/slim=on")) == []


def test_train_control_and_evaluate_a_pruned_checkpoint(make_cfg, tmp_path):
    """model/slim=on trains; mtl.control picks widths for a budget and a preference and writes
    a smaller checkpoint that mtl.load and the evaluation rebuild from its stored config."""
    import numpy as np
    from omegaconf import OmegaConf

    import mtl
    from mtl.control import run
    from mtl.train import train

    tasks = ["model/slim=on", "model/backbone=vit_tiny", "data.tasks=[semseg,depth,normals]"]
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
    short.append("trainer.num_sanity_val_steps=0")
    train(make_cfg(*tasks, *short, "model/decoder=conv", "model.slim.random_configs=1"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    output = tmp_path / "small.ckpt"
    preference = {"semseg": 0.6, "depth": 0.3, "normals": 0.1}
    report = run(
        OmegaConf.create(
            {"ckpt_path": str(checkpoint), "budget": 0.6, "preference": preference,
             "output": str(output)}
        )
    )  # fmt: skip
    widths = report["widths"]
    assert widths["semseg"] >= widths["depth"] >= widths["normals"]
    assert report["flops_fraction"] <= 0.6 and report["parameters"] < report["full_parameters"]
    assert (checkpoint.parent / "last.ckpt.flops.json").is_file()  # the cached FLOPs table

    loaded = mtl.load(output)
    assert sum(p.numel() for p in loaded.model.parameters()) == report["parameters"]
    depth = loaded.predict(np.zeros((40, 50, 3), np.uint8), ["depth"])["depth"]
    assert depth.shape == (1, 40, 50)
    scores = train(make_cfg("train=false", f"ckpt_path={output}", output_dir=tmp_path / "eval"))
    assert 0 <= scores["test/semseg/mIoU"] <= 1 and scores["params/total"] == report["parameters"]

    single = tmp_path / "depth.ckpt"  # one head kept: single-task deployment
    options = {"ckpt_path": str(checkpoint), "budget": 0.6, "tasks": ["depth"]}
    options["output"] = str(single)
    depth_only = run(OmegaConf.create(options))
    assert set(depth_only["widths"]) == {"encoder", "depth"}
    assert mtl.load(single).tasks == ["depth"] and depth_only["parameters"] < report["parameters"]
