"""bf16 mixed precision with every kind of balancer, and the optional compiled backbone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mtl.compile import compile_options
from mtl.config import ConfigError
from mtl.train import build_datamodule, build_model, build_module

SMALL = [
    "data.tasks=[semseg,depth]",
    "model/decoder=conv",
    "model.backbone.out_indices=[1,2]",
    "diagnostics_every_n_steps=0",
]


@pytest.mark.parametrize(
    "balancer",
    [["balancer=uncertainty"], ["balancer=pcgrad"], ["balancer=equal", "flat=sam"]],
    ids=["loss-weighting", "gramian", "flat"],
)
def test_bf16_mixed_trains_every_kind_of_balancer(make_cfg, balancer):
    cfg = make_cfg(*SMALL, *balancer, "trainer.precision=bf16-mixed")
    L.seed_everything(0)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    before = [p.detach().clone() for p in module.parameters()]
    dtypes = []
    module.model.backbone.register_forward_hook(lambda m, i, out: dtypes.append(out[-1].dtype))
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert torch.bfloat16 in dtypes  # the forward really ran under bf16 autocast
    after = list(module.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)
    changed = [not torch.equal(a, b) for a, b in zip(after, before, strict=True)]
    assert all(changed[: len(list(module.model.backbone.parameters()))])  # shared parameters
    assert sum(changed) > 0.9 * len(changed)


def test_compiled_backbone_keeps_outputs_gradients_and_parameter_names(make_cfg):
    torch.manual_seed(0)
    eager = build_model(make_cfg(*SMALL)).eval()
    torch.manual_seed(0)
    # dynamo tracing without a C++ compiler: the `model.compile` hook, cheaply
    compiled = build_model(make_cfg(*SMALL, "model.compile={backend: eager}")).eval()
    assert compiled.backbone._compiled_call_impl is not None
    assert eager.backbone._compiled_call_impl is None  # off by default
    names = [name for name, _ in eager.named_parameters()]
    assert [name for name, _ in compiled.named_parameters()] == names  # checkpoints unchanged
    images = torch.randn(2, 3, 48, 64)
    expected, preds = eager(images), compiled(images)
    for task in expected:
        torch.testing.assert_close(preds[task], expected[task])
    shared = list(compiled.backbone.parameters())
    grads = torch.autograd.grad(preds["depth"].mean(), shared)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compile_option_is_checked_and_off_by_default(make_cfg):
    assert make_cfg().model.compile is False
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune"}
    with pytest.raises(ConfigError, match="model.compile: 'yes'"):
        compile_options("yes")
