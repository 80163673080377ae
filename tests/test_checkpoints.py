"""Checkpoints that survive kills: exact resumption, signals, atomic writes, damaged and
incompatible files, ``weights_only`` loading."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from omegaconf import open_dict

from mtl.checkpoint import (
    CONFIG_KEY,
    SIGNATURE_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    IncompatibleCheckpointError,
    _create_temporary,
    contain_paths,
    find_resume_checkpoint,
    load_checkpoint,
    resolve_ckpt_path,
    signature_differences,
)
from mtl.cli import reporting_errors
from mtl.optim import warmup_poly
from mtl.train import TRAINING_HINT, train

ROOT = Path(__file__).resolve().parents[1]
# A small model (timm's test ResNet, two tasks, narrow heads: 7 MB checkpoints)
SMALL = (
    "model.backbone.name=test_resnet",
    "data.tasks=[semseg,depth]",
    "model.decoder.hidden_channels=16",
    "trainer.num_sanity_val_steps=0",
)
# 16 training images, batches of 4, 3 of them per epoch; 2 epochs; one validation batch
RUN = (
    *SMALL,
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
)


class SelfSignal(L.Callback):
    """Sends `signum` to this process at the end of training step `step` (a scheduler's stop)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _with_self_signal(cfg, step: int, signum: int):
    with open_dict(cfg):
        cfg.callbacks["self_signal"] = {
            "_target_": f"{SelfSignal.__module__}.SelfSignal",
            "step": step,
            "signum": int(signum),
        }
    return cfg


def _final(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.ckpt")


def _assert_close(a, b, where: str = "") -> None:
    """Nested containers equal, tensors up to float round-off."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _assert_same_training_state(a: dict, b: dict) -> None:
    for key in ("global_step", "state_dict", "optimizer_states", "lr_schedulers"):
        _assert_close(a[key], b[key], key)


def _cli(run: Path, data_root: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "data.generate.n_train=16",
        "data.generate.n_val=8",
        "data.image_size=[48,64]",
        f"data.root={data_root}",
        f"hydra.run.dir={run}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        *SMALL,
        *overrides,
    ]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def test_sigkill_then_auto_resume_gives_the_uninterrupted_parameters_and_famo_state(
    make_cfg, tiny_data_root, tmp_path
):
    overrides = (*RUN, "balancer=famo", "ckpt_every_n_steps=2")
    train(make_cfg(*overrides, output_dir=tmp_path / "full"))  # also generates the data
    full = _final(tmp_path / "full")

    run = tmp_path / "killed"
    process = subprocess.Popen(
        _cli(run, tiny_data_root, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(run / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < killed_at < full["global_step"]  # killed mid-training

    train(make_cfg(*overrides, "resume=auto", output_dir=run))
    resumed = _final(run)
    _assert_same_training_state(full, resumed)
    for name in ("logits", "previous_loss"):  # FAMO's task logits and loss history
        key = f"balancer.{name}"
        assert not torch.equal(full["state_dict"][key], torch.zeros_like(full["state_dict"][key]))
        torch.testing.assert_close(resumed["state_dict"][key], full["state_dict"][key])
    famo_adam = "balancer._extra_state"
    torch.testing.assert_close(
        resumed["state_dict"][famo_adam]["state"], full["state_dict"][famo_adam]["state"]
    )


@pytest.mark.parametrize(
    ("balancer", "signum", "step", "position"),
    [
        # saved after step 4: mid-epoch
        ("uncertainty", signal.SIGTERM, 3, {"epoch": 1, "batches": 1}),
        # saved after step 3: the epoch's last batch, before its validation
        ("dwa", signal.SIGINT, 2, {"epoch": 1, "batches": 0}),
    ],
)
def test_signal_saves_and_resume_matches_uninterrupted(
    make_cfg, tmp_path, balancer, signum, step, position
):
    overrides = (*RUN, f"balancer={balancer}")
    train(make_cfg(*overrides, output_dir=tmp_path / "full"))
    full = _final(tmp_path / "full")

    run = tmp_path / "stopped"
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as stop:
        # the signal arrives at the end of `step`, the checkpoint follows the next step
        train(_with_self_signal(make_cfg(*overrides, output_dir=run), step, signum))
    assert stop.value.code == 128 + signum
    saved = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == step + 1 and saved["MultiTaskDataModule"] == position
    assert signal.getsignal(signum) is before  # the handlers are given back

    train(make_cfg(*overrides, "ckpt_path=last", output_dir=run))
    resumed = _final(run)
    _assert_same_training_state(full, resumed)
    balancer_keys = [k for k in full["state_dict"] if k.startswith("balancer.")]
    assert balancer_keys  # log_vars, or DWA's loss history
    for key in balancer_keys:
        torch.testing.assert_close(resumed["state_dict"][key], full["state_dict"][key])


class Killed(Exception):
    """A process's sudden death, raised where a SIGKILL would stop it."""


class Kill(L.Callback):
    """Raises `Killed` at the end of training step `step` (``at="batch"``) or of epoch `epoch`
    (``at="epoch"``), before the checkpoint callbacks (Lightning runs them last) save there: the
    files on disk are then those a SIGKILL at that moment would leave."""

    def __init__(self, at: str, step: int = -1, epoch: int = -1) -> None:
        self.at, self.step, self.epoch = at, step, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "batch" and trainer.global_step == self.step:
            raise Killed(f"killed after step {self.step}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.at == "epoch" and trainer.current_epoch == self.epoch:
            raise Killed(f"killed at the end of epoch {self.epoch}")


def _with_kill(cfg, **where):
    with open_dict(cfg):
        cfg.callbacks["kill"] = {"_target_": f"{Kill.__module__}.Kill", **where}
    return cfg


# Where the newest checkpoint on disk was written when the run died, and what it must hold: the
# position of the next batch in the data, 3 batches per epoch. Lightning's counters differ at
# each save point (its processed-epoch counter is already incremented at an epoch's end).
SAVE_POINTS = {
    # the default: last.ckpt and epoch_000.ckpt at the end of epoch 0, after its validation
    "epoch end": ((), {"at": "batch", "step": 4}),
    # validation every 3 batches: saved when validation ends, inside the epoch's last step
    "validation end": (("+trainer.val_check_interval=3",), {"at": "batch", "step": 4}),
    # ckpt_every_n_steps: saved after the epoch's last step, before its validation
    "every n steps": (("ckpt_every_n_steps=3",), {"at": "epoch", "epoch": 0}),
    # SIGTERM during step 2: saved after the epoch's last step, then the process exits
    "signal": ((), {"signal": int(signal.SIGTERM), "step": 2}),
}


def test_resume_from_an_epoch_boundary_checkpoint_matches_uninterrupted(make_cfg, tmp_path):
    # one loader worker, the synthetic data's default: a worker draws the first epoch's order
    # before Lightning sets the epoch, so a wrong stored epoch changes the batches
    overrides = (*RUN, "balancer=uncertainty", "data.num_workers=1")
    train(make_cfg(*overrides, output_dir=tmp_path / "full"))
    full = _final(tmp_path / "full")
    assert full["global_step"] == 6

    for name, (extra, where) in SAVE_POINTS.items():
        run = tmp_path / name.replace(" ", "_")
        cfg = make_cfg(*overrides, *extra, output_dir=run)
        if "signal" in where:
            with pytest.raises(SystemExit):
                train(_with_self_signal(cfg, where["step"], where["signal"]))
        else:
            with pytest.raises(Killed):
                train(_with_kill(cfg, **where))
        saved = load_checkpoint(run / "checkpoints" / "last.ckpt")
        assert saved["global_step"] == 3, name
        assert saved["MultiTaskDataModule"] == {"epoch": 1, "batches": 0}, name

        train(make_cfg(*overrides, *extra, "resume=auto", output_dir=run))
        resumed = _final(run)
        try:
            _assert_same_training_state(full, resumed)
        except AssertionError as error:
            raise AssertionError(f"resumed from the {name} checkpoint: {error}") from None


def test_sigkill_after_an_end_of_epoch_checkpoint_then_auto_resume_matches_uninterrupted(
    make_cfg, tiny_data_root, tmp_path
):
    overrides = (*RUN, "trainer.max_epochs=3")
    workers = "data.num_workers=1"  # the synthetic data's default
    train(make_cfg(*overrides, workers, output_dir=tmp_path / "full"))
    full = _final(tmp_path / "full")

    run = tmp_path / "killed"
    process = subprocess.Popen(
        _cli(run, tiny_data_root, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(run / "checkpoints" / "last.ckpt", process)  # written at an epoch's end
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    saved = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] in (3, 6)  # epoch 0's, rarely epoch 1's
    assert saved["MultiTaskDataModule"] == {"epoch": saved["global_step"] // 3, "batches": 0}

    train(make_cfg(*overrides, workers, "resume=auto", output_dir=run))
    _assert_same_training_state(full, _final(run))


def test_sigterm_to_a_training_process_saves_a_loadable_checkpoint(tiny_data_root, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        _cli(run, tiny_data_root, "trainer.max_epochs=1000", "ckpt_every_n_steps=1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(run / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"saved checkpoint {last} after signal SIGTERM" in output
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] >= 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_job_with_loader_workers_saves_and_exits_cleanly(
    tiny_data_root, tmp_path, signum
):
    """SLURM's SIGTERM and a terminal's Ctrl+C reach every process of the job, loader workers
    included: the run still saves after the step and exits with 128 + signal, no traceback."""
    run = tmp_path / "run"
    command = _cli(run, tiny_data_root, "trainer.max_epochs=1000", "ckpt_every_n_steps=1")
    command.append("data.num_workers=2")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a job under a scheduler
    )  # fmt: skip
    _wait_for(run / "checkpoints" / "last.ckpt", process)
    os.killpg(process.pid, signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"saved checkpoint {last} after signal {signal.Signals(signum).name}" in output
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= 1


def _checkpoint(make_cfg, run: Path, *overrides: str) -> Path:
    """A checkpoint of one training step."""
    limits = (
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
    )
    train(make_cfg(*SMALL, *limits, *overrides, output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def test_checkpoint_loads_with_weights_only_and_holds_plain_config_and_signature(
    make_cfg, tmp_path
):
    path = _checkpoint(make_cfg, tmp_path / "run")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint[SIGNATURE_KEY]["tasks"] == ["semseg", "depth"]
    assert type(checkpoint[CONFIG_KEY]) is dict and checkpoint[CONFIG_KEY]["seed"] == 42
    assert not list(path.parent.glob("*.tmp"))


def test_interrupted_atomic_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, path)

    def half_written(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


class FullDisk(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes: later writes fail with ENOSPC, as
    ``write(2)`` does there (``torch.save`` then raises a RuntimeError during the OSError)."""

    def __init__(self, file, room: int = 4096) -> None:
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def test_disk_full_during_a_save_ends_in_one_error_line(make_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    directory = run / "checkpoints"
    cfg = make_cfg(*RUN, "callbacks.model_checkpoint.save_top_k=0", output_dir=run)
    opened = []
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):  # the disk fills up after epoch 0's save
        file = real_fdopen(fd, mode, *args, **kwargs)
        opened.append(mode)
        return FullDisk(file) if mode == "wb" and len(opened) > 1 else file

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(SystemExit) as stop:
        reporting_errors(lambda: train(cfg))
    message = str(stop.value.code)
    assert "\n" not in message and "Traceback" not in message
    size = (directory / "last.ckpt").stat().st_size
    match = re.fullmatch(
        rf"error: no space left on device for checkpoint {directory / 'last.ckpt'}: "
        rf"it needs about ([0-9.]+) MB in {directory} \(([0-9.]+) MB free\); .*",
        message,
    )
    assert match, message
    assert float(match[1]) == pytest.approx(size / 1e6, rel=0.05)  # the file written before
    assert [p.name for p in directory.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert load_checkpoint(directory / "last.ckpt")["global_step"] == 3  # epoch 0's


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from mtl.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}, "global_step": 1}}, {str(path)!r})
def killed(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 partial"); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed
io.save_checkpoint({{"state_dict": {{"w": torch.ones(3)}}, "global_step": 2}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["global_step"] == 1


def test_a_run_removes_the_temporary_files_of_saves_killed_in_its_directory(
    make_cfg, tmp_path, caplog
):
    last = _checkpoint(make_cfg, tmp_path / "run")
    orphans = []
    for name in ("last.ckpt", "epoch_003.ckpt", "last.ckpt"):  # saves killed half-way
        fd, tmp = _create_temporary(last.parent / name)
        os.write(fd, b"PK\x03\x04 partial")  # 12 bytes
        os.close(fd)
        orphans.append(Path(tmp))
    names = (".last.ckpt.tmp", "notes.tmp", "last.ckpt.0123456789ab.tmp", ".a.ckpt.0123.tmp")
    others = [last.parent / name for name in names]
    for path in others:
        path.write_text("not ours")

    with caplog.at_level(logging.INFO, logger="mtl.checkpoint"):
        _checkpoint(make_cfg, tmp_path / "run", "resume=auto")  # the same command again
    assert not any(path.exists() for path in orphans)
    assert all(path.read_text() == "not ours" for path in others)
    removed = "removed 3 temporary files of interrupted checkpoint saves (36 bytes)"
    assert removed in caplog.text
    for path in orphans:
        assert path.name in caplog.text


def test_damaged_checkpoint_is_named_and_auto_resume_falls_back(make_cfg, tmp_path, caplog):
    good = _checkpoint(make_cfg, tmp_path / "run")
    directory = good.parent
    previous = directory / "epoch_000.ckpt"
    for path in directory.glob("*.ckpt"):
        if path != good:
            path.unlink()
    good.rename(previous)
    last = directory / "last.ckpt"
    data = previous.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated, and newer
    os.utime(previous, (time.time() - 60, time.time() - 60))

    with pytest.raises(CheckpointError, match=f"checkpoint {last} cannot be loaded"):
        load_checkpoint(last)
    with caplog.at_level(logging.WARNING, logger="mtl.checkpoint"):
        assert find_resume_checkpoint(directory) == previous
    assert f"checkpoint {last} cannot be loaded" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text
    assert resolve_ckpt_path(make_cfg("resume=auto", output_dir=tmp_path / "run")) == str(previous)
    # an explicit path is not second-guessed: the damaged file fails at load, named
    cfg = make_cfg(*SMALL, f"ckpt_path={last}", output_dir=tmp_path / "run")
    with pytest.raises(CheckpointError, match=f"checkpoint {last} cannot be loaded"):
        train(cfg)


def test_incompatible_checkpoint_is_refused_naming_the_difference(make_cfg, tmp_path):
    path = _checkpoint(make_cfg, tmp_path / "two")
    overrides = (*SMALL, "data.tasks=[semseg]", "model.decoder.hidden_channels=8")
    cfg = make_cfg(*overrides, f"ckpt_path={path}", output_dir=tmp_path / "one")
    with pytest.raises(IncompatibleCheckpointError) as error:
        train(cfg)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} was written for another model")
    assert "tasks: checkpoint ['semseg', 'depth'], config ['semseg']" in message
    assert "task_channels: checkpoint {'semseg': 5, 'depth': 1}, config {'semseg': 5}" in message
    assert not (tmp_path / "one" / "checkpoints" / "last.ckpt").exists()  # nothing trained


def test_crafted_checkpoint_paths_outside_the_run_are_not_deleted(make_cfg, tmp_path, caplog):
    limits = ("+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1")
    run = tmp_path / "run"
    train(make_cfg(*SMALL, *limits, "trainer.max_epochs=2", output_dir=run))
    path = run / "checkpoints" / "last.ckpt"
    victim = tmp_path / "precious.txt"
    victim.write_text("not a checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    states = [s for s in checkpoint["callbacks"].values() if "best_k_models" in s]
    assert len(states) == 2  # epoch_NNN.ckpt and last.ckpt
    for state in states:  # Lightning deletes these as stale checkpoints of the callback
        crafted = f"{state['dirpath']}/../../{victim.name}"
        score = next(iter(state["best_k_models"].values()))
        state.update(
            best_k_models={crafted: score},
            kth_best_model_path=crafted,
            best_model_path=crafted,
            last_model_path=crafted,
        )
    torch.save(checkpoint, path)
    assert torch.load(path, weights_only=True)["callbacks"]  # passes weights_only loading

    with caplog.at_level(logging.WARNING, logger="mtl.checkpoint"):
        train(make_cfg(*SMALL, *limits, "trainer.max_epochs=3", "resume=auto", output_dir=run))
    assert victim.read_text() == "not a checkpoint"
    assert f"outside the checkpoint directory {path.parent}" in caplog.text
    assert load_checkpoint(path)["global_step"] == 3  # resumed and trained on


def test_contain_paths_keeps_the_inside_best_k_entries_and_recomputes_best_and_kth(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    inside, other = str(directory / "epoch_001.ckpt"), str(directory / "epoch_003.ckpt")
    outside = f"{directory}/../../x.ckpt"
    state = {
        "best_k_models": {outside: 0.1, inside: 0.5, other: 0.3},
        "best_model_path": outside,
        "kth_best_model_path": inside,
        "last_model_path": str(directory / "last.ckpt"),
    }
    assert contain_paths(state, directory, mode="min") == [outside]
    assert list(state["best_k_models"]) == [inside, other]
    assert state["best_model_path"] == other and state["best_model_score"] == 0.3
    assert state["kth_best_model_path"] == inside and state["kth_value"] == 0.5
    assert state["last_model_path"] == str(directory / "last.ckpt")


#: Resumed with another training setting, and the line naming it in the error
OTHER_TRAINING = {
    "balancer=dwa": "balancer: checkpoint 'mtl.balancers.weighting.Uncertainty', "
    "config 'mtl.balancers.weighting.DWA'",
    "optim=sgd": "optimizer: checkpoint 'torch.optim.AdamW', config 'torch.optim.SGD'\n"
    "  optimizer.momentum: checkpoint unset, config 0.9",
    "+optim.optimizer.amsgrad=true": "optimizer.amsgrad: checkpoint unset, config True",
}


def test_resuming_with_another_balancer_or_optimiser_is_refused_naming_it(make_cfg, tmp_path):
    run = tmp_path / "run"
    path = _checkpoint(make_cfg, run, "balancer=uncertainty")
    config = (run / "config.yaml").read_text()
    longer = ("balancer=uncertainty", "trainer.max_epochs=2", "resume=auto")
    for change, difference in OTHER_TRAINING.items():
        with pytest.raises(SystemExit) as stop:
            reporting_errors(lambda change=change: _checkpoint(make_cfg, run, *longer, change))
        assert str(stop.value.code) == (
            f"error: checkpoint {path} was trained with another balancer or optimiser:\n"
            f"  {difference}\n  {TRAINING_HINT}"
        )
        assert load_checkpoint(path)["global_step"] == 1  # nothing trained
        assert (run / "config.yaml").read_text() == config  # the run's config is kept


class RecordRates(L.Callback):
    """Records (step, learning rate) before every training step, in `rates`."""

    rates: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordRates.rates.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def _rates(cfg) -> dict[int, float]:
    RecordRates.rates.clear()
    with open_dict(cfg):
        cfg.callbacks["rates"] = {"_target_": f"{RecordRates.__module__}.RecordRates"}
    train(cfg)
    return dict(RecordRates.rates)


def test_resuming_with_another_learning_rate_and_weight_decay_applies_them(
    make_cfg, tmp_path, caplog
):
    full = _rates(make_cfg(*RUN, output_dir=tmp_path / "full"))
    assert sorted(full) == [0, 1, 2, 3, 4, 5] and min(full.values()) > 0

    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(_with_kill(make_cfg(*RUN, output_dir=run), at="batch", step=4))
    changed = ("optim.optimizer.lr=2e-3", "optim.optimizer.weight_decay=1e-3", "resume=auto")
    with caplog.at_level(logging.INFO, logger="mtl.resume"):
        resumed = _rates(make_cfg(*RUN, *changed, output_dir=run))
    applied = "optim.optimizer.lr: 0.002 applied from step 3 (the checkpoint's was 0.001)"
    assert applied in caplog.text
    assert (
        "optim.optimizer.weight_decay: 0.001 applied from step 3 (the checkpoint's was 0.0001)"
        in caplog.text
    )
    # the schedule continues from step 3 as a run with the new base rate: twice the rates
    assert sorted(resumed) == [3, 4, 5]
    for step, rate in resumed.items():
        assert rate == pytest.approx(2 * full[step], rel=1e-9), step
    (group,) = _final(run)["optimizer_states"][0]["param_groups"]
    assert group["initial_lr"] == 2e-3 and group["weight_decay"] == 1e-3
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["optimizer"]["lr"] == 2e-3


@pytest.mark.parametrize("short", [1, 2])
def test_a_schedule_state_loads_into_the_schedule_of_a_longer_run(short):
    """A run resumed with more epochs restores the shorter run's scheduler state."""
    weight = torch.nn.Parameter(torch.zeros(1))
    saved = warmup_poly(torch.optim.SGD([weight], lr=0.1), total_steps=short, warmup_steps=50)
    # the first step: at the base rate in a one-step run (no room for a warm-up), else at 1%
    assert saved.get_last_lr() == [0.1 if short == 1 else 0.1 * 0.01]
    longer = warmup_poly(torch.optim.SGD([weight], lr=0.1), total_steps=100, warmup_steps=50)
    longer.load_state_dict(saved.state_dict())
    assert longer.last_epoch == saved.last_epoch == 0


def test_signature_differences_name_backbone_adapter_and_classes():
    saved = {"backbone": "resnet18", "adapter": "none", "num_classes": {"semseg": 5}}
    current = {"backbone": "vit_tiny", "adapter": "lora", "num_classes": {"semseg": 5}}
    assert signature_differences(saved, current) == [
        "adapter: checkpoint 'none', config 'lora'",
        "backbone: checkpoint 'resnet18', config 'vit_tiny'",
    ]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_checkpoint_files_get_the_permissions_of_the_umask(tmp_path, umask):
    path = tmp_path / "last.ckpt"
    previous = os.umask(umask)
    try:
        for value in (1.0, 2.0):  # a new file, then one replaced
            AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor(value)}}, path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # e.g. 0644 under 022
    finally:
        os.umask(previous)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_resuming_with_another_smoothing_is_a_training_difference():
    from mtl.resume import training_differences, training_signature

    base = {
        "balancer": {"_target_": "mtl.balancers.gramian.UPGrad"},
        "smoothing": {"_target_": None},
    }
    smoothed = {**base, "smoothing": {"_target_": "mtl.balancers.smoothing.CRMOGM"}}
    assert training_differences(training_signature(base), training_signature(smoothed)) == [
        "smoothing: checkpoint unset, config 'mtl.balancers.smoothing.CRMOGM'"
    ]
