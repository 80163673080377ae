"""Credentials never reach the run files: redact them from the resolved config before it is
written (``config.yaml``), logged as hyperparameters or stored in checkpoints.

A string value is redacted when its key looks like a credential (a name part such as ``key``,
``token``, ``secret``, ``password``, ``credential``, ``auth``: ``api_key``, ``WANDB_API_KEY``,
``hf_token``), when it was resolved from such an environment variable (``${oc.env:WANDB_API_KEY}``
under any key), or when it contains the value of a credential-named environment variable that
is set. Numbers and booleans are kept (``reg_tokens: 4`` is no secret).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "***REDACTED***"
_SECRET_PARTS = {
    "key", "keys", "apikey", "token", "tokens", "secret", "secrets", "password", "passwd",
    "pwd", "credential", "credentials", "auth",
}  # fmt: skip
_ENV = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")
#: Environment values shorter than this are not searched for (too likely to occur by chance).
_MIN_SECRET_LENGTH = 8


def is_secret_name(name: str) -> bool:
    """True for names like ``api_key``, ``WANDB_API_KEY``, ``hfToken``, ``db-password``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    return any(part in _SECRET_PARTS for part in re.split(r"[^A-Za-z0-9]+", spaced.lower()))


def _secret_env_values() -> list[str]:
    return [
        value
        for name, value in os.environ.items()
        if is_secret_name(name) and len(value) >= _MIN_SECRET_LENGTH
    ]


def _env_paths(node: Any, path: tuple = ()) -> set[tuple]:
    """Paths of the unresolved config whose value reads a credential-named environment variable."""
    found: set[tuple] = set()
    if isinstance(node, DictConfig):
        items = ((k, node._get_node(k)) for k in node)
    elif isinstance(node, ListConfig):
        items = ((i, node._get_node(i)) for i in range(len(node)))
    else:
        return found
    for key, child in items:
        if isinstance(child, DictConfig | ListConfig):
            found |= _env_paths(child, (*path, key))
        else:
            raw = child._value() if child is not None else None
            if isinstance(raw, str) and any(is_secret_name(n) for n in _ENV.findall(raw)):
                found.add((*path, key))
    return found


def redact(resolved: Any, cfg: DictConfig | None = None) -> Any:
    """A copy of the resolved config (plain containers) with credentials replaced by
    ``REDACTED``; ``cfg``, the unresolved config, also finds values read from credential-named
    environment variables."""
    env_paths = _env_paths(cfg) if cfg is not None else set()
    secrets = _secret_env_values()

    def walk(node: Any, path: tuple, secret_key: bool) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v, (*path, k), is_secret_name(str(k))) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, (*path, i), secret_key) for i, v in enumerate(node)]
        if not (isinstance(node, str) and node):
            return node
        secret = secret_key or path in env_paths or any(s in node for s in secrets)
        return REDACTED if secret else node

    return walk(resolved, (), False)


def resolved_config(cfg: DictConfig) -> dict:
    """``OmegaConf.to_container(cfg, resolve=True)`` with credentials redacted."""
    return redact(OmegaConf.to_container(cfg, resolve=True), cfg)
