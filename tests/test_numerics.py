"""Non-finite losses, gradients or buffers skip the optimiser step (parameters, Adam state,
schedule and buffers such as BatchNorm statistics untouched), name the task or buffer, and stop
the run after ``max_bad_steps`` consecutive bad steps."""

from __future__ import annotations

import copy
import logging
import math

import lightning as L
import pytest
import torch

from mtl.numerics import NonFiniteError, StepGuard, nonfinite_gradients, nonfinite_losses
from mtl.train import build_datamodule, build_module

#: No gradient-conflict diagnostics (an extra backward per task on step 0), a slim decoder.
FAST = ("diagnostics_every_n_steps=0", "model.decoder.hidden_channels=8")


def test_nonfinite_losses_and_gradients_name_the_task():
    nan, inf = torch.tensor(math.nan), torch.tensor(math.inf)
    losses = {"semseg": torch.tensor(1.0), "depth": nan, "edge": inf}
    assert nonfinite_losses(losses) == ["depth", "edge"]
    assert nonfinite_losses({"semseg": torch.tensor(2.0)}) == []

    shared, head_a, head_b = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    for p in (shared, head_a, head_b):
        p.grad = torch.ones(3)
    tasks = {"a": [head_a], "b": [head_b]}
    assert nonfinite_gradients([shared, head_a, head_b], tasks) == []
    head_b.grad[1] = math.nan
    assert nonfinite_gradients([shared, head_a, head_b], tasks) == ["b"]
    head_b.grad[1] = 0.0
    shared.grad[0] = math.inf
    assert nonfinite_gradients([shared, head_a, head_b], tasks) == ["gradient"]
    gram = torch.tensor([[1.0, 0.0], [0.0, math.inf]])
    assert nonfinite_gradients([shared, head_a, head_b], tasks, gram) == ["b"]


def test_guard_stops_after_consecutive_bad_steps_only():
    guard = StepGuard(max_bad_steps=2)
    guard.bad("loss", ["depth"], step=0, epoch=0)
    guard.good()
    guard.bad("loss", ["depth"], step=1, epoch=0)
    with pytest.raises(NonFiniteError, match="2 consecutive .* in depth"):
        guard.bad("gradient", ["depth"], step=1, epoch=0)


def _fit(cfg, bad_calls, patch_task="depth", max_steps=3):
    """Fit for `max_steps` batches; the `patch_task` loss is NaN on the listed training calls.
    Returns the module, the trainer and per-call snapshots (before, after) of the state."""
    L.seed_everything(0)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    original, calls = module.task_losses, {"n": 0}

    def task_losses(preds, batch, tasks=None):
        losses = original(preds, batch, tasks)
        if module.training and calls["n"] in bad_calls:
            losses[patch_task] = losses[patch_task] * math.nan
        return losses

    module.task_losses = task_losses
    snapshots: dict[int, dict] = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            snapshots[calls["n"]] = {
                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                "buffers": _buffers(pl_module),
                "adam": copy.deepcopy(optimizer.state_dict()["state"]),
                "lr": [g["lr"] for g in optimizer.param_groups],
                "step": trainer.global_step,
                "no_grads": all(p.grad is None for p in pl_module.parameters()),
            }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            calls["n"] += 1

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_train_batches=max_steps + 3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Snapshot()],
    )
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        snapshots["final"] = {
            "params": {n: p.detach().clone() for n, p in module.named_parameters()},
            "buffers": _buffers(module),
            "adam": copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "step": trainer.global_step,
        }
    return module, trainer, snapshots


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The training state's buffers (BatchNorm statistics, balancer state; not the metrics')."""
    buffers = module.named_buffers()
    return {n: b.detach().clone() for n, b in buffers if not n.startswith("metrics.")}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _same(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_nan_loss_of_one_task_skips_that_step_and_names_the_task(make_cfg, caplog):
    cfg = make_cfg("optim.scheduler.warmup_steps=2", *FAST)
    with caplog.at_level(logging.WARNING, logger="mtl.numerics"):
        module, trainer, snaps = _fit(cfg, bad_calls={1}, max_steps=3)
    before_bad, after_bad = snaps[1], snaps[2]
    assert before_bad["step"] == 1 and after_bad["step"] == 1  # no optimiser step counted
    assert _same(before_bad["params"], after_bad["params"])
    assert before_bad["adam"] and _same(before_bad["adam"], after_bad["adam"])  # moments, step
    assert before_bad["lr"] == after_bad["lr"]  # the scheduler did not advance
    # BatchNorm statistics as the skipped step found them; good steps do move them
    assert any("running_var" in name for name in before_bad["buffers"])
    assert _same(before_bad["buffers"], after_bad["buffers"])
    assert not _same(snaps[0]["buffers"], snaps[1]["buffers"])
    assert not _same(snaps[2]["params"], snaps["final"]["params"])  # training went on
    assert trainer.global_step == 3 and module.guard.skipped == 1
    assert after_bad["no_grads"]  # the skipped step zeroed the gradients
    assert "non-finite loss at step 1 (epoch 0) in depth; optimiser step skipped" in caplog.text


def test_nan_gradient_of_one_head_is_named(make_cfg, caplog):
    cfg = make_cfg(*FAST)
    L.seed_everything(0)
    module = build_module(cfg)
    head = next(iter(module.model.task_parameters()["normals"]))
    handle = head.register_hook(lambda grad: grad * math.nan)
    datamodule = build_datamodule(cfg.data)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    buffers = _buffers(module)
    with caplog.at_level(logging.WARNING, logger="mtl.numerics"):
        trainer.fit(module, datamodule=datamodule)
    handle.remove()
    assert trainer.global_step == 0  # both batches skipped, below max_bad_steps=3
    assert all(torch.equal(initial[n], p) for n, p in module.named_parameters())
    assert _same(buffers, _buffers(module))  # the forward passes' BatchNorm updates undone
    assert "non-finite gradient at step 0 (epoch 0) in normals" in caplog.text


def test_consecutive_bad_steps_stop_the_run_with_a_message(make_cfg):
    cfg = make_cfg("max_bad_steps=2", *FAST)
    with pytest.raises(NonFiniteError) as info:
        _fit(cfg, bad_calls={0, 1, 2, 3}, patch_task="semseg")
    message = str(info.value)
    assert "2 consecutive training steps had non-finite values" in message
    assert "non-finite loss at step 0 (epoch 0) in semseg" in message
    assert "debug=anomaly" in message


def test_debug_anomaly_turns_on_anomaly_detection(make_cfg):
    assert make_cfg("debug=anomaly").trainer.detect_anomaly is True
    assert make_cfg().trainer.get("detect_anomaly") in (None, False)


def test_nonfinite_batchnorm_statistics_skip_the_step_and_name_the_buffer(make_cfg, caplog):
    """A running variance that overflows in one step's forward pass (loss and gradients finite)
    is found: the step is skipped, the buffer named, and the statistics put back."""
    cfg = make_cfg(*FAST)
    L.seed_everything(0)
    module = build_module(cfg)
    norm = module.model.backbone.model.layer2[0].bn1
    calls = {"n": 0}

    def overflow(bn, inputs, output):
        if bn.training and calls["n"] == 1:
            bn.running_var.data[3] = math.inf  # .data: autograd saved this tensor
        calls["n"] += 1

    norm.register_forward_hook(overflow)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mtl.numerics"):
        trainer.fit(module, datamodule=build_datamodule(cfg.data))
    assert trainer.global_step == 2 and module.guard.skipped == 1
    assert (
        "non-finite buffer at step 1 (epoch 0) in model.backbone.model.layer2.0.bn1"
        ".running_var; optimiser step skipped" in caplog.text
    )
    assert all(b.isfinite().all() for b in _buffers(module).values() if b.is_floating_point())


def test_huge_learning_rate_stops_with_finite_batchnorm_statistics(make_cfg):
    """``optim.optimizer.lr=1e6`` on the default model: the steps whose BatchNorm statistics
    overflow are skipped (the buffers named) until the run stops; no buffer is left at inf."""
    cfg = make_cfg("optim.optimizer.lr=1e6", "optim.scheduler=null", *FAST)
    L.seed_everything(0)
    module = build_module(cfg)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"running_var"):
        trainer.fit(module, datamodule=build_datamodule(cfg.data))
    buffers = _buffers(module).items()
    assert [n for n, b in buffers if b.is_floating_point() and not b.isfinite().all()] == []


def test_skipped_step_leaves_the_balancer_state_as_it_was(make_cfg):
    """FAMO updates its task logits, their optimiser and its last losses inside the step:
    a step skipped for a non-finite gradient after a good one leaves all of them as they were."""
    cfg = make_cfg("balancer=famo", *FAST)
    L.seed_everything(0)
    module = build_module(cfg)
    head = next(iter(module.model.task_parameters()["normals"]))
    calls = {"n": 0}

    def poison_second_step(grad):
        calls["n"] += 1
        return grad * math.nan if calls["n"] == 2 else grad

    head.register_hook(poison_second_step)
    states = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states.append(copy.deepcopy(pl_module.balancer.state_dict()))

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Snapshot()],
    )  # fmt: skip
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    assert trainer.global_step == 1 and module.guard.skipped == 1
    assert bool(states[0]["has_previous"])  # the good step recorded its losses
    assert _same(states[0], states[1])
