"""The test of record for exactness under DDP: 2 CPU processes (gloo) end with the same
parameters as 1 process on the concatenated batch, for every kind of balancer."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mtl.train import build_datamodule, build_module

STEPS = 3
# Tasks whose losses are means over all pixels (no invalid pixels in the synthetic scenes for
# these), so the mean of the two processes' losses is the loss of the concatenated batch.
EXACT_TASKS = "data.tasks=[semseg,normals,edge]"
DETERMINISTIC = [
    "data.train_transform.scale_range=null",
    "data.train_transform.flip=false",
    "data.train_transform.photometric=false",
    "optim=sgd",  # linear in the gradients: Adam would amplify float round-off in tiny grads
    "diagnostics_every_n_steps=1",
    # No batch statistics: SyncBatchNorm needs GPUs, so on CPU processes use LayerNorm (ViT)
    # and GroupNorm heads.
    "model/backbone=vit_tiny",
    "+model.backbone.patch_size=8",
    "model.backbone.out_indices=[1,3]",
    "model.decoder.norm=group",
]


def _fit(quiet_trainer, cfg, devices: int) -> dict[str, torch.Tensor]:
    L.seed_everything(cfg.seed)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    trainer = quiet_trainer(
        cfg,
        devices,
        overfit_batches=STEPS,  # sequential sampling: rank r reads samples r, r+2, ...
        max_epochs=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    if devices == 1:
        assert module.global_step == STEPS
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.parametrize(
    "balancer",
    [
        ["balancer=equal"],
        ["balancer=uncertainty"],
        ["balancer=pcgrad"],
        ["balancer=cagrad"],
        ["balancer=mgda"],
        ["balancer=mgda", "balancer.mode=rep"],
        ["balancer=upgrad", "balancer.jacobian=streamed"],  # rows all-reduced bucket by bucket
        ["balancer=nash", "balancer.mode=rep"],  # update capped after the averaged backward
        ["balancer=dbmtl"],  # a T x P state from the all-reduced Jacobian and losses
        ["balancer=pcgrad", "flat=sam", "flat.rho=0.5"],
    ],
    ids=lambda overrides: "+".join(o.split("=")[1] for o in overrides),
)
def test_two_processes_equal_one_process_on_the_global_batch(make_cfg, quiet_trainer, balancer):
    cfg = make_cfg(EXACT_TASKS, *DETERMINISTIC, *balancer, "trainer=ddp_cpu")
    _assert_same_training(cfg, _fit(quiet_trainer, cfg, 1), _fit(quiet_trainer, cfg, 2))


def test_mixture_of_experts_under_ddp_equals_one_process(make_cfg, quiet_trainer):
    """Plain DDP (no unused-parameter search) is exact for MoE with deterministic routing (no
    routing noise, no batch-dependent balance loss): the experts of a layer are slices of one
    parameter, so experts no token of a process reaches still get a (zero) gradient there."""
    cfg = make_cfg(
        EXACT_TASKS,
        *DETERMINISTIC,
        "trainer=ddp_cpu",
        "model/adapter=moe",
        # 64 experts, top-1, one MoE block, 12 tokens per image: each process's batch leaves
        # most experts unused, and not the same ones.
        "model.backbone.patch_size=16",
        "model.adapter.blocks=[1]",
        "model.adapter.num_experts=64",
        "model.adapter.top_k=1",
        "model.adapter.noise_std=0",
        "model.adapter.balance_weight=0",
    )
    _assert_same_training(cfg, _fit(quiet_trainer, cfg, 1), _fit(quiet_trainer, cfg, 2))


def _assert_same_training(cfg, single: dict, double: dict) -> None:
    initial = build_module(cfg).model.state_dict()
    moved = 0
    for name, value in single.items():
        if value.is_floating_point():
            # float round-off only: the processes disagree by far less than training moved
            change = (value - initial[name]).abs().max()
            error = (double[name] - value).abs().max()
            assert error <= 2e-3 * change + 1e-6, f"{name}: {error:.2e} vs update {change:.2e}"
            moved += int(change > 0)
    assert moved > 10  # training changed the weights, so the comparison means something
