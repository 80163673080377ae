"""Every shell command and Python example in README.md and datasets/README.md runs as written.

The commands are read from the ```bash blocks (and the ```python examples) of both files and run,
in the order the files give them, in a scratch copy of the repository root (its entry points,
``conf/`` and ``baselines/``; the package is the installed one), so they create ``data/`` and
``outputs/`` there exactly as they would for a user. The only arguments a test adds are
size-reducing ones (``debug=fdr`` or ``debug=limit``, tiny generated data, fewer Optuna trials),
and placeholders the README asks the user to fill in (``<run>``, ``/data/NYUD_MT``, a weights
file, the offline Hugging Face cache) become small folders and files written here in the
official formats. Commands that need a GPU or a SLURM cluster are composed and resolved instead
of run. A command no rule below knows fails: a command added to the README
must come with a way to run it here, or a stated reason why it cannot.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "datasets/README.md")

#: What a user's checkout has at its root that the commands read (copied, never linked, so that
#: nothing a command writes can reach the repository).
ENTRY_POINTS = ("train.py", "eval.py", "predict.py")
FOLDERS = ("conf", "baselines", "bench")

#: The tiny synthetic scenes (train, val, height, width): as many training scenes as the largest
#: batch a README command asks for (a smaller split gives no batch and is refused).
SCENES = (32, 8, 48, 64)
#: Size-reducing overrides for the built-in synthetic scenes.
TINY_SYNTHETIC = (
    f"data.generate.n_train={SCENES[0]}",
    f"data.generate.n_val={SCENES[1]}",
    f"data.image_size=[{SCENES[2]},{SCENES[3]}]",
)
#: ... and for the real datasets' small generated copies (images of 48x64).
TINY_REAL = ("data.image_size=[48,64]", "data.batch_size=2", "data.num_workers=0")
#: A short fit (2 epochs of a few batches) that writes checkpoints, which debug=fdr does not.
SHORT_FIT = ("debug=limit",)

#: Modules that read what earlier commands wrote and run as they are.
READ_ONLY_MODULES = (
    "bench.trivial_baselines",
    "mtl.metrics.baselines",
    "mtl.compare",
    "mtl.control",
)
#: Words of a training command that needs the checkpoints a real fit writes (``outputs/merging``:
#: the single-task runs ``python -m mtl.merge`` reads).
NEEDS_CHECKPOINTS = ("resume=", "ckpt_path=", "ckpt_every", "output_dir", "outputs/merging")
GPU_ONLY = "needs a CUDA GPU: its first job is composed and resolved (--cfg job) instead"
CLUSTER_ONLY = "needs a SLURM cluster: its first job is composed and resolved (--cfg job) instead"
NOT_RUN = {
    "pip": "the install step: CI runs it itself (.ci/run)",
    "wget": "downloads a dataset (no network here; mtl.data.formats writes the layouts)",
    "tar": "unpacks a downloaded dataset",
    "ln": "links a downloaded dataset",
    "mkdir": "prepares the download folder",
    "cd": "changes to the download folder",
    "export": "switches W&B to online logging (needs an account and network)",
}
BENCHMARK = "a benchmark (minutes to tens of minutes); tests/test_bench.py runs every section small"


@dataclass
class Command:
    """One command of a README: where it is, its words, and how this test runs it."""

    document: str
    line: int
    argv: list[str]
    extra: list[str] = field(default_factory=list)
    skip: str | None = None
    compose_only: bool = False

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}:{' '.join(self.argv)[:70]}"


def shell_lines(text: str) -> list[tuple[int, str]]:
    """The lines of the ```bash blocks, continuation lines joined, with their line numbers."""
    lines, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks, each as one program, with the line number of its first line."""
    blocks, code, start = [], None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() == "```python":
            code, start = [], number + 1
        elif line.strip() == "```" and code is not None:
            blocks.append((start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


def readme_commands() -> list[Command]:
    """Every command of the documents, split at ``&&``, and every Python example (run as
    ``python -c``), in the order of each document, with its plan."""
    commands = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        found = []
        for line, shell in shell_lines(text):
            words = shlex.split(shell, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(Command(document, line, words[:cut]))
                words = words[cut + 1 :]
        for line, code in python_blocks(text):
            found.append(Command(document, line, ["python", "-c", code]))
        commands += [plan(c) for c in sorted(found, key=lambda c: c.line)]
    return commands


def _dataset(argv: list[str]) -> str:
    joined = " ".join(argv)
    if "experiment=nyud" in joined or "--dataset nyud" in joined:
        return "nyud"
    if "experiment=pascal" in joined or "--dataset pascal" in joined:
        return "pascal"
    return "synthetic"


def first_job(argv: list[str]) -> list[str]:
    """A multirun command as its first job (``--cfg`` composes one job, not a sweep): ``-m``
    dropped and each swept ``key=a,b`` given its first value."""
    job = []
    for word in argv:
        if word in ("-m", "--multirun"):
            continue
        key, _, value = word.partition("=")
        if value and "," in value and not value.startswith(("[", "{", "'", '"')):
            word = f"{key}={value.split(',')[0]}"
        job.append(word)
    return job


def plan(command: Command) -> Command:
    """Decide how ``command`` runs here: the size-reducing arguments it gets, or why it cannot."""
    argv = command.argv
    program = argv[0]
    if program in NOT_RUN:
        command.skip = NOT_RUN[program]
        return command
    if program != "python":
        return command  # unknown: fails in the test, naming the command
    if argv[1] == "-c":
        return command  # a Python example: it reads what earlier commands wrote
    if argv[1:3] == ["-m", "pytest"]:
        command.skip = "the test command itself"
        return command
    if argv[1] == "-m":
        module = argv[2]
        if module in READ_ONLY_MODULES:
            pass
        elif module == "bench" or module.startswith("bench."):
            command.skip = BENCHMARK
        elif module == "mtl.data.synthetic":
            train, val, height, width = map(str, SCENES)
            command.extra = ["--n-train", train, "--n-val", val, "--size", height, width]
        elif module == "mtl.merge":  # merges the tiny runs of an earlier command
            command.extra = ["realign.steps=2"]
        elif module == "mtl.data.verify":
            command.extra = ["--allow-subset"]  # the generated copies hold a few ids per split
        else:
            command.extra = ["<no rule>"]  # unknown module: the test fails naming it
        return command
    script = argv[1]
    if script not in ENTRY_POINTS:
        command.extra = ["<no rule>"]
        return command
    words = " ".join(argv)
    size = TINY_REAL if _dataset(argv) != "synthetic" else TINY_SYNTHETIC
    if "hydra/launcher=slurm" in words or "trainer=gpu" in words:
        command.compose_only = True
        command.skip = CLUSTER_ONLY if "hydra/launcher=slurm" in words else GPU_ONLY
        command.argv = first_job(argv)
        command.extra = [*size, "--cfg", "job", "--resolve"]
        return command
    if script == "predict.py":
        return command  # its own small config: images and a checkpoint, nothing to shrink
    evaluates = script == "eval.py" or "train=false" in words
    if evaluates or "debug=" in words:
        command.extra = [*size]
    elif "hparams_search=optuna" in words:
        command.extra = [*size, "debug=fdr", "hydra.sweeper.n_trials=2"]
    elif "ddp" in words or any(key in words for key in NEEDS_CHECKPOINTS):
        command.extra = [*size, *SHORT_FIT]  # real checkpoints, or several processes
    else:
        command.extra = [*size, "debug=fdr"]
    return command


COMMANDS = readme_commands()


# ------------------------------------------------------------------------- the scratch checkout
@dataclass
class Checkout:
    """The scratch repository root and the placeholders of the README resolved in it."""

    root: Path
    placeholders: dict[str, str]


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``argv`` in ``cwd`` as a user would; timm's hub weights come from ``cwd/hub``, the
    offline cache the README tells the user to fill."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MTL_", "HF_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_CACHE=str(cwd / "hub"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable if argv[0] == "python" else argv[0], *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _random_timm_state(model_name: str) -> dict:
    """A random-init timm state dict: what a weights file holds, minus the training."""
    import timm

    return timm.create_model(model_name, pretrained=False).state_dict()


def _weights_file(path: Path, model_name: str) -> None:
    """A weights file of ``model_name`` (``.safetensors`` or a PyTorch state dict)."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _random_timm_state(model_name).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def _hub_weights(cache: Path, model_name: str) -> None:
    """``timm/<model_name>`` in a Hugging Face hub cache, as the README's ``hf download`` on a
    connected machine leaves it (random weights)."""
    from safetensors.torch import save_file

    folder = cache / f"models--timm--{model_name}"
    if folder.exists():
        return
    revision = "0" * 40
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in _random_timm_state(model_name).items()}
    save_file(state, str(snapshot / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


def _hub_models(argv: list[str], conf: Path) -> list[str]:
    """The timm hub weights an experiment of ``argv`` reads (``model.backbone.pretrained``)."""
    import yaml

    names = []
    for word in argv:
        if word.startswith("experiment="):
            path = conf / "experiment" / f"{word.split('=', 1)[1]}.yaml"
            node = yaml.safe_load(path.read_text())
            backbone = (node.get("model") or {}).get("backbone") or {}
            if backbone.get("pretrained") and not any("pretrained_file=" in w for w in argv):
                names.append(backbone["name"])
    return names


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    from mtl.data.formats import write_nyud, write_pascal

    root = tmp_path_factory.mktemp("checkout")
    for name in ENTRY_POINTS:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, root / name)
    for name in FOLDERS:
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, root / name)
    (root / "datasets").mkdir()
    splits = {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1", "v2"]}
    write_nyud(root / "data" / "NYUD_MT", splits, variant="nyud_mt", size=(48, 64))
    write_pascal(root / "data" / "PASCAL_MT", splits, size=(48, 64), persons=("t0", "v0"))

    # the README's "<run>": a finished short run of the default experiment
    done = _run(["python", "train.py", *TINY_SYNTHETIC, *SHORT_FIT], root)
    assert done.returncode == 0, done.stderr[-3000:]
    run = sorted((root / "outputs" / "train" / "runs").iterdir())[-1]
    ckpt = f"outputs/train/runs/{run.name}/checkpoints/last.ckpt"
    placeholders = {
        "<run>": run.name,
        "ckpt_path=...": f"ckpt_path={ckpt}",
        "/data/NYUD_MT": str(root / "data" / "NYUD_MT"),
        "/data/PASCAL_MT": str(root / "data" / "PASCAL_MT"),
        "/path/to/scenes": str(root / "scenes"),
    }
    return Checkout(root, placeholders)


def _resolve(command: Command, checkout: Checkout) -> list[str]:
    """The command's words with the README's placeholders filled in, then the extra ones."""
    words = []
    dataset = _dataset(command.argv)
    for word in command.argv:
        if word == "data.root=...":
            word = {"nyud": "data.root=/data/NYUD_MT", "pascal": "data.root=/data/PASCAL_MT"}.get(
                dataset, "data.root=/path/to/scenes"
            )
        for key, value in checkout.placeholders.items():
            word = word.replace(key, value)
        match = re.search(r"(/weights/([\w.]+)\.(pth|safetensors))", word)
        if match:
            target = checkout.root / "weights" / Path(match.group(1)).name
            if not target.exists():
                _weights_file(target, match.group(2))
            word = word.replace(match.group(1), str(target))
        words.append(word)
    for name in _hub_models(command.argv, checkout.root / "conf"):
        _hub_weights(checkout.root / "hub", name)
    return [*words, *command.extra]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs_as_written(command: Command, checkout: Checkout) -> None:
    if not _has_rule(command):
        pytest.fail(f"no rule runs this README command; add one to {Path(__file__).name}")
    if command.skip and not command.compose_only:
        pytest.skip(command.skip)
    argv = _resolve(command, checkout)
    redirect = None
    if ">" in argv:  # `command > FILE`: the file gets what the command prints
        argv, redirect = argv[: argv.index(">")], argv[argv.index(">") + 1]
    done = _run(argv, checkout.root)
    if redirect:
        (checkout.root / redirect).write_text(done.stdout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(argv)}\nexit {done.returncode}\n{output[-4000:]}"
    assert "Traceback" not in output, f"{' '.join(argv)}\n{output[-4000:]}"


def _has_rule(command: Command) -> bool:
    return "<no rule>" not in command.extra and command.argv[0] in ("python", *NOT_RUN)


def test_every_readme_command_has_a_rule() -> None:
    unknown = [c.id for c in COMMANDS if not _has_rule(c)]
    assert not unknown, f"README commands without a rule here: {unknown}"


def test_every_balancer_config_is_in_the_readme_table():
    """The README's balancer table names every config of ``conf/balancer/`` once."""
    text = (ROOT / "README.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")]
    configs = sorted(path.stem for path in (ROOT / "conf" / "balancer").glob("*.yaml"))
    assert [name for name in configs if rows.count(f"`{name}`") != 1] == []
