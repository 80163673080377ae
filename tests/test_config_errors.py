"""Every invalid choice is reported before anything is built, in one message naming the key,
the value and what is allowed."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mtl.train
from mtl.config import ConfigError
from mtl.train import train

ROOT = Path(__file__).resolve().parents[1]
VIT = "model/backbone=vit_tiny"

CASES = [
    (["data.tasks=[semseg,parts]"],
     ["data.tasks: task 'parts' is not provided by dataset 'synthetic'; available: ['semseg'"]),
    (["data.tasks=[semseg,albedo]"], ["data.tasks: unknown task 'albedo'; registered tasks:"]),
    (["model.decoder=null"],
     ["model.decoder: None; every task in data.tasks needs a decoder (head)",
      "one of aspp, conv, hrnet, mlore, taskexpert"]),
    (["model/adapter=moe"], ["model.adapter: moe needs a plain ViT backbone"]),
    (["model/decoder=mlore", "model.decoder.image_size=[64,64]"],
     ["model.decoder.image_size: [64, 64] differs from data.image_size"]),
    (["+data.loss_options={edge:{weight:0.9}}"],
     ["data.loss_options.edge.weight: not an option of the edge loss; its options: "
      "['pos_weight']"]),
    ([VIT, "model/decoder=mlore", "data.image_size=[40,64]"],
     ["data.image_size: [40, 64] is not a multiple of the ViT patch size 16"]),
    (["model/decoder=mlore", "model.decoder.topk=16"],
     ["model.decoder.topk: 16; expected an integer from 1 to 15"]),
    ([VIT, "model/adapter=lora", "model.adapter.rank=0"],
     ["model.adapter.rank: 0; expected a positive integer"]),
    ([VIT, "model/adapter=moe", "model.adapter.num_experts=4", "model.adapter.top_k=5"],
     ["model.adapter.top_k: 5; expected 1..num_experts (4)"]),
    ([VIT, "model/adapter=moe", "model.adapter.top_k=0"],
     ["model.adapter.top_k: 0; expected 1..num_experts (16)"]),
    ([VIT, "model/adapter=mtlora", "balancer=pcgrad", "balancer.mode=rep"],
     ["balancer.mode: 'rep' needs one shared representation, but the adapter is task-aware"]),
    (["balancer=equal", "balancer.mode=rep"], ["balancer.mode: 'rep' is for gradient methods"]),
    (["data.batch_size=6", "trainer.devices=4"],
     ["data.batch_size: 6 is the global batch and must be divisible by trainer.devices x "
      "trainer.num_nodes = 4"]),
    (["optim.optimizer.lr=0"], ["optim.optimizer.lr: 0; expected a number > 0"]),
    (["optim=sgd", "optim.optimizer.momentum=1.5"],
     ["optim.optimizer.momentum: 1.5; expected a number in [0, 1)"]),
    (["optim.grad_clip_norm=-1"], ["optim.grad_clip_norm: -1; expected a number > 0, or null"]),
    (["optim.scheduler.warmup_steps=-5"],
     ["optim.scheduler.warmup_steps: -5; expected an integer >= 0"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs: 0; expected an integer >= 1 (-1: no limit)"]),
    (["trainer.precision=17"], ["trainer.precision: 17; expected one of ["]),
    (["+trainer.accumulate_grad_batches=4"], ["trainer.accumulate_grad_batches: 4; expected 1"]),
    (["+trainer.gradient_clip_val=1.0"],
     ["trainer.gradient_clip_val: 1.0; expected null", "optim.grad_clip_norm"]),
    (["data.num_workers=-1"], ["data.num_workers: -1; expected an integer >= 0"]),
    (["data.image_size=[0,64]"], ["data.image_size: [0, 64]; expected [height, width]"]),
    (["data.loss_weights.depth=-1"], ["data.loss_weights.depth: -1; expected a number >= 0"]),
    (["data.skip_bad=maybe"], ["data.skip_bad: 'maybe'; expected true or false"]),
    (["data.val_fraction=1"],
     ["data.val_fraction: 1; expected a number in [0, 1) (0: no held-out split)"]),
    (["max_bad_steps=0"], ["max_bad_steps: 0; expected an integer >= 1"]),
    (["eval_ckpt=first"], ["eval_ckpt: 'first'; expected best or last"]),
    (["resume=sometimes"], ["resume: 'sometimes'; expected never or auto"]),
    (["data.tasks=semseg"], ["data.tasks: 'semseg' is a single name; expected a list: "
                             "data.tasks=[semseg]"]),
    (["+trainer.max_epoch=1"], ["trainer.max_epoch: not an argument of the Trainer "
                                "(lightning.pytorch.Trainer); did you mean trainer.max_epochs?"]),
    (["train=false"], ["ckpt_path: missing; evaluation (eval.py, train.py train=false) scores a "
                       "checkpoint: ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt"]),
    (["balancer=fairgrad", "balancer.alpha=-1"], ["balancer.alpha: -1"]),
    (["smoothing=cr_mogm", "smoothing.alpha=2"], ["smoothing.alpha: 2"]),
    (["balancer=dbmtl", "balancer.mode=rep"],
     ["balancer.mode: 'rep'; DBMTL supports only 'param'"]),
    (["balancer=moco", "flat=sam"], ["flat: MoCo keeps a state"]),
    (["balancer=modo", "data.batch_size=2"],
     ["data.batch_size: MoDo splits each process's batch into 3 independent parts"]),
    (["balancer=stch", "balancer.mu=0"], ["balancer: balancer.mu=0; expected a positive number"]),
    (["balancer=pcgrad", "balancer.reduction=max"], ["balancer: "]),
    (["balancer=nash", "balancer.max_norm=-1"],
     ["balancer.max_norm: -1; expected a number > 0, or null (no cap)"]),
    (["balancer=graddrop", "+balancer.jacobian=streamed"],
     ["balancer.jacobian: 'streamed' never holds the T x P Jacobian, but GradDrop needs all"]),
    (["balancer=equal", "+balancer.jacobian=streamed"],
     ["balancer.jacobian: 'streamed' streams the task gradients of a gradient method; Equal"]),
    (["balancer=pcgrad", "balancer.jacobian=streaming"],
     ["balancer.jacobian: 'streaming'; expected 'stored' or 'streamed'"]),
    (["balancer=pcgrad", "balancer.jacobian=streamed", "flat=sam"],
     ["balancer.jacobian: 'streamed' cannot be combined with flat=sam|asam"]),
    (["data.batch_size=true"], ["data.batch_size: True; expected a positive integer"]),
    (["optim.optimizer.lr=inf"], ["optim.optimizer.lr: inf; expected a finite number"]),
    (["optim.optimizer.weight_decay=nan"],
     ["optim.optimizer.weight_decay: nan; expected a finite number"]),
    (["data.tasks=[semseg,depth,semseg]"],
     ["data.tasks: 'semseg' is listed twice; each task once"]),
    (["data.train_transform.scale_range=[1.5,0.5]"],
     ["data.train_transform.scale_range: [1.5, 0.5]; expected [low, high] with 0 < low <= high"]),
    (["ckpt_every_n_steps=abc"], ["ckpt_every_n_steps: 'abc'; expected an integer >= 0"]),
    (["data.root=null"], ["data.root: None; expected the dataset's folder"]),
    (["ckpt_path=/nonexistent/last.ckpt"],
     ["ckpt_path: no checkpoint file at /nonexistent/last.ckpt"]),
    (["delta_m_baselines=nosuch"], ["delta_m_baselines: baselines 'nosuch' not found"]),
    (["optimized_metric=val/foo"],
     ["optimized_metric: 'val/foo' is not a score this run reports; its scores: ['params/total'"]),
    (["data.tasks=[semseg,depth]", "optimized_metric=val/normals/mean_angle"],
     ["optimized_metric: 'val/normals/mean_angle' is not a score this run reports",
      "'val/depth/rmse'"]),
    (["++data.metric_options.edge.online_thresholds=-1", "++data.metric_options.edge.workers=all"],
     ["data.metric_options.edge.workers: 'all'; expected a count of processes >= 0",
      "data.metric_options.edge.online_thresholds: -1; expected a count >= 0"]),
    (["optimized_metric=test/semseg/mIoU"],
     ["optimized_metric: 'test/semseg/mIoU' is not a score this run reports",
      "'val/semseg/mIoU'"]),
    (["data.available_tasks=[depth,normals]", "data.tasks=[depth]",
      "data.aux_tasks=[sem_boundary]"],
     ["data.aux_tasks: 'sem_boundary' is computed from the semseg labels, which dataset "
      "'synthetic' does not provide (its tasks: ['depth', 'normals'])"]),
    (["data.tasks=[semseg,sem_boundary]"],
     ["data.tasks: 'sem_boundary' is a training-only task (a loss, no scores); train it with "
      "data.aux_tasks=[sem_boundary]"]),
    (["data.aux_tasks=[depth]"],
     ["data.aux_tasks: 'depth' is a reported task: list it in data.tasks; training-only tasks: "
      "['sem_boundary']"]),
    (["data.aux_tasks=[sem_boundary]", "data.gpu_augment=true"],
     ["data.aux_tasks: the targets of ['sem_boundary'] are computed in the loader workers after "
      "the augmentation, but data.gpu_augment=true"]),
    ([VIT, "model/adapter=mtlora", "data.aux_tasks=[sem_boundary]"],
     ["data.aux_tasks: the auxiliary heads of ['sem_boundary'] read one shared representation, "
      "but the adapter is task-aware"]),
    (["optimized_metric=val/sem_boundary/loss", "data.aux_tasks=[sem_boundary]"],
     ["optimized_metric: 'val/sem_boundary/loss' is not a score this run reports"]),
]  # fmt: skip


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a datamodule, model or trainer is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("built before the config was validated")

    for name in ("build_datamodule", "build_module", "build_model", "build_callbacks"):
        monkeypatch.setattr(mtl.train, name, refuse)


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_invalid_choice_is_reported_before_building(
    make_cfg, nothing_built, tmp_path, overrides, expected
):
    data_root = tmp_path / "never_generated"
    cfg = make_cfg(f"data.root={data_root}", *overrides)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("invalid configuration:\n  - ")
    for part in expected:
        assert part in message, message
    assert not data_root.exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_all_problems_come_in_one_message(make_cfg, nothing_built):
    cfg = make_cfg(
        "data.tasks=[semseg,parts]",
        "optim.optimizer.lr=-1",
        "trainer.max_epochs=0",
        "data.num_workers=-2",
        "max_bad_steps=0",
    )
    with pytest.raises(ConfigError) as info:
        train(cfg)
    lines = str(info.value).splitlines()[1:]
    keys = [line.split(":")[0].strip(" -") for line in lines]
    assert keys == [
        "data.tasks",
        "optim.optimizer.lr",
        "trainer.max_epochs",
        "data.num_workers",
        "max_bad_steps",
    ]


def test_unknown_group_option_is_a_short_hydra_message():
    result = subprocess.run(
        [sys.executable, "train.py", "balancer=foo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Could not find 'balancer/foo'" in result.stderr
    assert "Available options in 'balancer'" in result.stderr and "pcgrad" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_worker_errors_are_shown_without_the_worker_traceback():
    spec = importlib.util.spec_from_file_location("entry", ROOT / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    from mtl.data.base import DatasetError

    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nmtl.data.base.DatasetError: NYUD-v2 sample '
        "'s1': cannot decode image: /data/images/s1.jpg\n"
    )
    assert entry.user_message(wrapped) == (
        "NYUD-v2 sample 's1': cannot decode image: /data/images/s1.jpg"
    )
    assert entry.user_message(DatasetError("plain")) == "plain"


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# A user's command line as typed, each with the README's data.root (never generated here).
COMMANDS = [
    (["eval.py"], "ckpt_path: missing; evaluation (eval.py, train.py train=false) scores a "
                  "checkpoint: ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt"),
    (["train.py", "train=false"], "ckpt_path: missing; evaluation"),
    (["train.py", "+trainer.max_epoch=1"], "trainer.max_epoch: not an argument of the Trainer "
                                           "(lightning.pytorch.Trainer); did you mean "
                                           "trainer.max_epochs?"),
    (["train.py", "data.tasks=semseg"], "data.tasks: 'semseg' is a single name; expected a list: "
                                        "data.tasks=[semseg]"),
    (["train.py", "ckpt_every_n_steps=abc"], "ckpt_every_n_steps: 'abc'; expected an integer >= 0"),
    (["train.py", "optimized_metric=val/semseg/miou"],
     "optimized_metric: 'val/semseg/miou' is not a score this run reports"),
    (["train.py", "resume=yes"], "resume: 'yes'; expected never or auto"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "expected"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_a_mistake_on_the_command_line_is_one_error_line(tmp_path, command, expected):
    data_root = tmp_path / "scenes"
    result = subprocess.run(
        [sys.executable, *command, f"data.root={data_root}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = _error_lines(result)
    assert errors == ["error: invalid configuration:"]
    assert f"  - {expected}" in result.stderr
    assert not data_root.exists()  # reported before anything was built


def test_synthetic_scenes_of_other_counts_and_size_are_one_error_line(tmp_path):
    from mtl.data.synthetic import generate

    data_root = generate(tmp_path / "scenes", n_train=2, n_val=1, size=(32, 40))
    result = subprocess.run(
        [sys.executable, "train.py", f"data.root={data_root}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = _error_lines(result)
    assert len(errors) == 1
    assert errors[0].startswith(f"error: data.root: the synthetic scenes at {data_root} were ")
    assert (
        "set data.generate.n_train, data.generate.n_val, data.image_size to the generated values, "
        "or point data.root to another folder" in errors[0]
    )


def test_a_training_split_smaller_than_one_batch_is_one_error_line(tmp_path):
    """8 scenes and the default batch of 16: training drops incomplete batches, so the run would
    train nothing and score an untrained model with exit status 0."""
    tiny = ["data.generate.n_train=8", "data.generate.n_val=4", "data.image_size=[48,64]"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *tiny, "data.num_workers=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert _error_lines(result) == [
        "error: data.batch_size=16: the training split has 8 samples, fewer than one batch "
        "(incomplete batches are dropped, so nothing would be trained); set data.batch_size to "
        "at most 8"
    ]
    assert not list(tmp_path.glob("outputs/train/runs/*/checkpoints/*.ckpt"))


def test_a_data_root_that_is_a_file_is_reported_before_building(make_cfg, nothing_built, tmp_path):
    file = tmp_path / "scenes"
    file.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        train(make_cfg(f"data.root={file}"))
    assert f"data.root: {file} is a file; expected a folder" in str(info.value)


def _read_only_prefix(folder: Path) -> list[str] | None:
    """A command prefix under which `folder` is read-only: its permissions for an ordinary
    user, a read-only mount in a private mount namespace for root (None: not possible here)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    mount = f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(folder))} && exec \"$@\""
    return ["unshare", "-m", "sh", "-c", mount, "sh"]


def test_synthetic_scenes_on_a_read_only_folder_are_one_error_line(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    prefix = _read_only_prefix(folder)
    if prefix is None:
        pytest.skip("no way to make a read-only folder here")
    data_root = folder / "scenes"
    result = subprocess.run(
        [*prefix, sys.executable, "train.py", f"data.root={data_root}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    folder.chmod(0o755)
    assert _error_lines(result) == ["error: invalid configuration:"], result.stderr[-2000:]
    assert (
        f"  - data.root: {data_root} does not exist and cannot be created ({folder} is not "
        "writable); the synthetic scenes are generated there on first use" in result.stderr
    )
