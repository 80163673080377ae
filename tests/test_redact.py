"""Credentials never reach the run files: config.yaml, logged hyperparameters, checkpoints."""

from __future__ import annotations

from pathlib import Path

import yaml

from mtl.redact import REDACTED, is_secret_name, redact
from mtl.train import train

SECRETS = {
    "WANDB_API_KEY": "wandb-0123456789abcdef",
    "MY_SERVICE_TOKEN": "tok-9876543210",
    "DB_PASSWORD": "hunter2-hunter2",
}


def test_secret_names():
    for name in ("api_key", "WANDB_API_KEY", "hfToken", "db-password", "client_secret", "auth"):
        assert is_secret_name(name), name
    for name in ("monitor", "max_epochs", "tokenizer", "author", "lr", "dirpath"):
        assert not is_secret_name(name), name


def test_redact_keeps_numbers_and_ordinary_values(monkeypatch):
    monkeypatch.setenv("SOME_SECRET", "abcdefgh12345")
    config = {
        "api_key": "k-123",
        "reg_tokens": 4,
        "class_token": True,
        "nested": [{"password": "p"}, "https://x:abcdefgh12345@host"],
        "name": "run",
    }
    assert redact(config) == {
        "api_key": REDACTED,
        "reg_tokens": 4,
        "class_token": True,
        "nested": [{"password": REDACTED}, REDACTED],
        "name": "run",
    }


def test_no_credential_in_config_hyperparameters_or_checkpoint(make_cfg, monkeypatch, tmp_path):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    cfg = make_cfg(
        "+wandb_api_key=${oc.env:WANDB_API_KEY}",  # a credential-named key
        "+notes.service=${oc.env:MY_SERVICE_TOKEN}",  # an ordinary key reading a credential
        "+notes.url=postgres://me:${oc.env:DB_PASSWORD}@db",  # a credential inside a value
        "+notes.plain=kept",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "diagnostics_every_n_steps=0",
        "model.decoder.hidden_channels=8",
    )
    train(cfg)
    run = tmp_path / "run"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["wandb_api_key"] == REDACTED
    assert written["notes"] == {"service": REDACTED, "url": REDACTED, "plain": "kept"}
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "hparams.yaml" for p in files)
    assert any(p.suffix == ".ckpt" for p in files)
    for path in files:
        data = Path(path).read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in data, f"{value} written to {path}"
