"""Credentials never reach the run files: config.yaml, .hydra/, logged hyperparameters (CSV,
TensorBoard, W&B), the W&B run name and metadata, checkpoints, logs; paths stay intact."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN
from test_tracking import wandb_records

from mtl.redact import REDACTED, is_secret_name, redact, redact_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_secret_names():
    secret = (
        "password", "passwd", "passphrase", "db-password", "DB_PASS", "smtpPass", "GITHUB_PAT",
        "token", "HF_TOKEN", "hfToken", "api_key", "apiKey", "WANDB_API_KEY", "api_keys",
        "secret", "client_secret", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "credentials", "auth",
    )  # fmt: skip
    for name in secret:
        assert is_secret_name(name), name
    ordinary = (
        "pwd", "PWD", "OLDPWD", "path", "dirpath", "passage", "compass", "bypass", "pass", "pat",
        "patience", "pattern", "monitor", "max_epochs", "tokenizer", "author", "lr", "reg_tokens",
        "exclude_keys",
    )  # fmt: skip
    for name in ordinary:
        assert not is_secret_name(name), name


def test_redact_keeps_paths_numbers_and_ordinary_values(monkeypatch, tmp_path):
    # a shell's PWD and other variables with ordinary names are no secrets
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", str(tmp_path))
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SOME_SECRET", "abcdefgh12345")
    monkeypatch.setenv("SHORT_TOKEN", "q7z")  # under 6 characters: not searched for
    config = {
        "api_key": "k-123",
        "reg_tokens": 4,
        "class_token": True,  # a boolean holds no secret
        "auth": None,
        "db": {"password": 5000000123, "port": 5432, "PASS": "x"},  # an integer password
        "nested": [{"password": "p"}, "https://x:abcdefgh12345@host"],
        "repo": "https://bob:hunter22@example.org/x.git",  # a password inside a URL
        "public": "https://example.org/x.git",
        "name": "run-q7z",
        "root": str(tmp_path / "data"),
        "paths": {"output_dir": str(tmp_path / "run"), "exclude_keys": ["paths.root_dir"]},
    }
    assert redact(config) == {
        "api_key": REDACTED,
        "reg_tokens": 4,
        "class_token": True,
        "auth": None,
        "db": {"password": REDACTED, "port": 5432, "PASS": "x"},
        "nested": [{"password": REDACTED}, REDACTED],
        "repo": REDACTED,
        "public": "https://example.org/x.git",
        "name": "run-q7z",
        "root": str(tmp_path / "data"),
        "paths": {"output_dir": str(tmp_path / "run"), "exclude_keys": ["paths.root_dir"]},
    }


def test_a_credential_copied_into_another_value_is_redacted_there_too():
    config = {"hub": {"token": "hf_abcdef123"}, "url": "https://hub/?t=hf_abcdef123", "n": 1}
    assert redact(config) == {"hub": {"token": REDACTED}, "url": REDACTED, "n": 1}


def test_redact_overrides(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_envtoken123")
    overrides = [
        "-m",
        "seed=3",
        "+db.password=ab",  # short, but under a credential name
        "+notes.url=https://bob:pw@host/x",
        "+notes.copy=x-hf_envtoken123",
        "+notes.ref=${oc.env:HF_TOKEN}",  # names the variable, not its value
        "data.root=/home/me/data",
    ]
    assert redact_overrides(overrides) == [
        "-m",
        "seed=3",
        f"+db.password={REDACTED}",
        f"+notes.url=https://bob:{REDACTED}@host/x",
        f"+notes.copy=x-{REDACTED}",
        "+notes.ref=${oc.env:HF_TOKEN}",
        "data.root=/home/me/data",
    ]


def test_wandb_run_name_has_no_credential(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from mtl.loggers import run_name

    monkeypatch.setenv("HF_TOKEN", "q7z9")  # too short to be searched for in text
    overrides = [
        "seed=3",
        "+notes.service=${oc.env:HF_TOKEN}",
        "+db.password=abc",
        "+notes.repo=https://bob:pw@host/x",
        f"data.root={tmp_path}",  # excluded from names (conf/hydra/default.yaml)
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        name = run_name(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert name == (
        f"+db.password={REDACTED},+notes.repo=https://bob:{REDACTED}@host/x,"
        "+notes.service=${oc.env:HF_TOKEN},seed=3"
    )


# ---------------------------------------------------------------- a whole run, as users start it

#: An experiment file of the user's with credentials in it.
EXPERIMENT = """\
# @package _global_
db:
  password: 5000000123
  api_key: yaml-api-key-5c1e
notes:
  aws_secret_access_key: yaml-aws-secret-9d2f
"""

ENV_SECRETS = {
    "WANDB_API_KEY": "env-wandb-key-0a1b2c",
    "HF_TOKEN": "hf_envtoken123456",
    "DB_PASS": "env-db-pass-77aa",
}
#: Every credential of the run and every key it ends up under.
SECRETS = [
    *ENV_SECRETS.values(),
    "yaml-api-key-5c1e",
    "yaml-aws-secret-9d2f",
    "cli-passphrase-3e4f",
    "cli-url-pw-8g9h",
    "cli-pat-1i2j3k",
    "5000000123",
]
INTEGER_PASSWORD = 5000000123
REDACTED_KEYS = {
    "db.password",
    "db.api_key",
    "db.passphrase",
    "notes.aws_secret_access_key",
    "notes.service",
    "notes.dsn",
    "notes.repo",
    "notes.github_pat",
}


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _encodings(secret: str) -> list[bytes]:
    """The ways a credential can be stored: text, and an integer as a double (TensorBoard
    hparams) or pickled (checkpoints)."""
    found = [secret.encode()]
    if secret.isdigit():
        number = int(secret)
        found += [struct.pack("<d", float(number)), pickle.dumps(number, protocol=2)[2:-1]]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_no_credential_in_any_file_of_a_run_and_its_wandb_run(mode, tmp_path, tiny_data_root):
    """Credentials from an experiment file, `+key=` overrides and `${oc.env:...}`: none in any
    file under the output tree (config.yaml, .hydra/, multirun.yaml, CSV and TensorBoard logs,
    W&B offline run, checkpoints, train.log), nor in the W&B run name; paths are kept."""
    checkout = tmp_path / "checkout"  # the user's copy of the repository, with their experiment
    shutil.copytree(ROOT / "conf", checkout / "conf")
    shutil.copy2(ROOT / "train.py", checkout / "train.py")
    (checkout / "conf" / "experiment" / "private_db.yaml").write_text(EXPERIMENT)
    home = tmp_path / "wandb_home"
    env = {
        **os.environ,
        **ENV_SECRETS,
        "PWD": str(checkout),  # as a shell sets it
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **{k: str(home) for k in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")},
    }
    command = [
        sys.executable,
        "train.py",
        *(["-m"] if mode == "multirun" else []),
        "experiment=private_db",
        "logger=[csv,tensorboard,wandb]",
        "seed=3",
        "+notes.service=${oc.env:HF_TOKEN}",  # an ordinary key reading a credential
        "+notes.dsn=postgres://me:${oc.env:DB_PASS}@db/x",  # a credential inside a value
        "+db.passphrase=cli-passphrase-3e4f",
        "+notes.repo=https://bob:cli-url-pw-8g9h@example.org/x.git",
        "+notes.github_pat=cli-pat-1i2j3k",
        *TINY_RUN,
        "+trainer.limit_train_batches=2",
        f"data.root={tiny_data_root}",
    ]
    done = subprocess.run(
        command, cwd=checkout, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr, f"{secret} on the console"

    outputs = checkout / "outputs"
    (job,) = list(outputs.glob("train/multiruns/*/0" if mode == "multirun" else "train/runs/*"))
    config = yaml.safe_load((job / "config.yaml").read_text())
    leaves = _leaves(config)
    assert {k for k, v in leaves.items() if v == REDACTED} == REDACTED_KEYS  # nothing else
    assert config["paths"]["output_dir"] == str(job)
    assert config["paths"]["root_dir"] == str(checkout)
    assert config["data"]["root"] == str(tiny_data_root)
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    assert f"+db.passphrase={REDACTED}" in overrides and "seed=3" in overrides

    (folder,) = list((job / "wandb").glob("offline-run-*"))
    run = next(r.run for r in wandb_records(folder) if r.WhichOneof("record_type") == "run")
    name = run.display_name.split(",")
    assert "seed=3" in name and f"+db.passphrase={REDACTED}" in name, name

    files = [p for p in [*outputs.rglob("*"), *home.rglob("*")] if p.is_file()]
    kinds = {p.suffix for p in files} | {p.name.split(".")[0] for p in files}
    expected = {".ckpt", ".wandb", ".csv", "events", "hparams", "train", "overrides", "hydra"}
    assert expected | ({"multirun"} if mode == "multirun" else set()) <= kinds, kinds
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            for form in _encodings(secret):
                assert form not in data, f"{secret} written to {path.relative_to(tmp_path)}"
    assert str(INTEGER_PASSWORD) == SECRETS[-1]
