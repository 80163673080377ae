"""Credentials never reach the run files: they are redacted from the resolved config before it
is written (``config.yaml``), logged as hyperparameters or stored in checkpoints, from Hydra's
files (``.hydra/*.yaml``, a sweep's ``multirun.yaml``; `RedactHydraFiles`), from the W&B run
name and from the command line W&B records (`redacted_argv`).

A credential is

- a value (string or number; booleans and null hold none) under a credential name
  (`is_secret_name`): ``password``, ``passwd``, ``passphrase``, ``token``, ``secret``, ``key``,
  ``credential(s)``, ``auth`` as a word of the name, ``*_PASS``, ``*_PAT`` (``api_key``,
  ``WANDB_API_KEY``, ``hfToken``, ``AWS_SECRET_ACCESS_KEY``, ``DB_PASS``, ``GITHUB_PAT``);
- a value read from a credential-named environment variable (``${oc.env:HF_TOKEN}``);
- the password of a URL (``https://user:PASSWORD@host``);
- any text containing the value of a credential-named environment variable or of a credential
  of the config, when that value has at least `MIN_SECRET_LENGTH` characters (shorter ones would
  match ordinary text by chance; they are still redacted under their own names).

In a config a value that holds a credential is replaced whole by `REDACTED`; in a command-line
override (``key=value``) only the credential is.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "***REDACTED***"
#: Values shorter than this are not searched for inside other text (too likely by chance).
MIN_SECRET_LENGTH = 6

# Words (of a name split at `_`, `-`, `.` and camelCase) that make it a credential name. The
# plurals ``keys`` and ``tokens`` name lists and counts (``exclude_keys``, ``reg_tokens``); ``pwd``
# is the working directory.
_SECRET_WORDS = frozenset(
    {"key", "token", "secret", "secrets", "password", "passwords", "passwd", "passphrase",
     "credential", "credentials", "auth"}
)  # fmt: skip
#: Words that make a credential name only as the last of several: ``DB_PASS``, ``GITHUB_PAT``.
_SECRET_LAST_WORDS = frozenset({"pass", "pat"})
_ENV = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")
#: ``scheme://user:PASSWORD@``: the password is group 2 (``\:`` too: Hydra escapes the
#: overrides of a multirun's jobs).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*\\?://[^\s:/@\\]*\\?:)([^\s/@]+)(?=@)")
#: The characters Hydra escapes with a backslash in the overrides of a multirun's jobs.
_HYDRA_ESCAPED = re.compile(r"([\\()\[\]{}:=, \t])")


def is_secret_name(name: str) -> bool:
    """True for names like ``api_key``, ``WANDB_API_KEY``, ``hfToken``, ``db-password``,
    ``DB_PASS``; false for ``pwd``, ``path``, ``passage``, ``bypass``, ``reg_tokens``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    words = [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]
    if any(w in _SECRET_WORDS for w in words) or "apikey" in "".join(words):
        return True
    return len(words) > 1 and words[-1] in _SECRET_LAST_WORDS


def _is_value(node: Any) -> bool:
    """Strings and numbers can hold a credential; booleans and null cannot."""
    return isinstance(node, str | int | float) and not isinstance(node, bool)


def _env_secrets() -> set[str]:
    return {value for name, value in os.environ.items() if is_secret_name(name)}


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


def _resolved(node: DictConfig | ListConfig) -> Any:
    """`node` as plain containers, resolved where it resolves (a value that does not, e.g. an
    unset environment variable, is kept as written: the job fails on it later, not here)."""
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - any resolution error: resolve the parts one by one
        pass
    keys = list(node) if isinstance(node, DictConfig) else range(len(node))
    out = {}
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            out[key] = _resolved(child)
        else:
            try:
                out[key] = node[key]
            except Exception:  # noqa: BLE001
                out[key] = child._value() if child is not None else None
    return out if isinstance(node, DictConfig) else list(out.values())


def _credentials(resolved: Any, env_paths: set[tuple]) -> list[str]:
    """The credentials of a config as text: values under credential names and at `env_paths`."""
    values: list[str] = []

    def collect(node: Any, path: tuple, secret: bool) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                collect(v, (*path, k), secret or is_secret_name(str(k)))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                collect(v, (*path, i), secret)
        elif _is_value(node) and (secret or path in env_paths):
            values.append(str(node))

    collect(resolved, (), False)
    return values


class Redactor:
    """The credentials of one run (`values`: the credential-named environment variables and
    those found in its config) and how to redact them from configs and override lines."""

    def __init__(self, values: Iterable[str] = (), env_paths: set[tuple] | None = None) -> None:
        found = {str(v) for v in values} | _env_secrets()
        found = {v for v in found if len(v) >= MIN_SECRET_LENGTH and v != REDACTED}
        found |= {_HYDRA_ESCAPED.sub(r"\\\1", v) for v in found}  # as in a multirun's overrides
        self.values = sorted(found, key=len, reverse=True)  # longest first: no partial leftovers
        self.env_paths = env_paths or set()

    @classmethod
    def of(cls, resolved: Any, cfg: DictConfig | None = None) -> Redactor:
        """The redactor of a config: `resolved` as plain containers and, to find the values read
        from credential-named environment variables, `cfg` unresolved."""
        env_paths = _env_paths(cfg) if cfg is not None else set()
        return cls(_credentials(resolved, env_paths), env_paths)

    @classmethod
    def of_config(cls, cfg: DictConfig) -> Redactor:
        """The redactor of a job's config `cfg` (with or without its ``hydra`` node)."""
        task, hydra_values = cfg, []
        if "hydra" in cfg:  # its override lists interpolate: only the credential-named values
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
            hydra_values = [v for v in _credentials(hydra, set()) if "${" not in v]
        resolved = _resolved(task)
        env_paths = _env_paths(task)
        values = [v for v in _credentials(resolved, env_paths) if "${" not in v]
        return cls([*values, *hydra_values], env_paths)

    def leaks(self, text: str) -> bool:
        """True when `text` holds a credential (a known value or a URL password)."""
        if any(value in text for value in self.values):
            return True
        return any(m.group(2) != REDACTED for m in _URL_PASSWORD.finditer(text))

    def scrub(self, text: str) -> str:
        """`text` with each credential in it (known values, URL passwords) replaced."""
        for value in self.values:
            text = text.replace(value, REDACTED)
        return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)

    def config(self, node: Any) -> Any:
        """A copy of `node` (plain containers) with every value holding a credential replaced
        whole by `REDACTED`."""

        def walk(node: Any, path: tuple, secret: bool) -> Any:
            if isinstance(node, Mapping):
                return {
                    k: walk(v, (*path, k), secret or is_secret_name(str(k)))
                    for k, v in node.items()
                }
            if isinstance(node, list | tuple):
                return [walk(v, (*path, i), secret) for i, v in enumerate(node)]
            if not _is_value(node):
                return node
            if secret or path in self.env_paths:
                return REDACTED
            if isinstance(node, str):
                return REDACTED if self.leaks(node) else node
            return REDACTED if str(node) in self.values else node

        return walk(node, (), False)

    def override(self, line: str) -> str:
        """A command-line argument (``key=value``, ``+key=value``, a flag) with its credential
        replaced: the whole value under a credential name, else the credentials inside it."""
        key, sep, value = line.partition("=")
        if not sep:
            return self.scrub(line)
        name = key.lstrip("+~")
        if any(is_secret_name(part) for part in name.split(".")) and value:
            return f"{key}={REDACTED}"
        return f"{key}={self.scrub(value)}"

    def overrides(self, lines: Sequence[str]) -> list[str]:
        return [self.override(str(line)) for line in lines]

    def override_dirname(self, overrides: Sequence[str], settings: Mapping) -> str:
        """Hydra's ``hydra.job.override_dirname`` (its ``get_overrides_dirname``: the overrides
        not in ``exclude_keys``, sorted, joined) of the redacted `overrides`; `settings` is
        ``hydra.job.config.override_dirname``."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        exclude = set(settings.get("exclude_keys") or ())
        try:
            parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
            kept = [o.input_line for o in parsed if o.key_or_group not in exclude]
        except Exception:  # noqa: BLE001 - not Hydra's syntax: every line, none excluded
            kept = [str(o) for o in overrides]
        lines = sorted(self.override(line) for line in kept)
        joined = str(settings.get("item_sep", ",")).join(lines)
        return re.sub("[=]", str(settings.get("kv_sep", "=")), joined)

    def hydra_file(self, node: Any) -> Any:
        """A Hydra file (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``, ``multirun.yaml``)
        as plain containers, redacted: the override lists line by line, the rest as a config."""
        if isinstance(node, list):  # overrides.yaml
            return self.overrides(node)
        hydra = node.get("hydra") if isinstance(node, dict) else None
        if isinstance(hydra, dict):
            given = hydra.get("overrides") or {}
            task = list(given.get("task") or [])
            job = hydra.get("job") or {}
            if job.get("override_dirname"):
                settings = (job.get("config") or {}).get("override_dirname") or {}
                job["override_dirname"] = self.override_dirname(task, settings)
            for kind in ("task", "hydra"):
                if isinstance(given.get(kind), list):
                    given[kind] = self.overrides(given[kind])
        return self.config(node)


def redact(resolved: Any, cfg: DictConfig | None = None) -> Any:
    """A copy of the resolved config (plain containers) with credentials replaced by
    ``REDACTED``; ``cfg``, the unresolved config, also finds values read from credential-named
    environment variables."""
    return Redactor.of(resolved, cfg).config(resolved)


def resolved_config(cfg: DictConfig) -> dict:
    """``OmegaConf.to_container(cfg, resolve=True)`` with credentials redacted."""
    return redact(OmegaConf.to_container(cfg, resolve=True), cfg)


def redact_overrides(lines: Sequence[str], cfg: DictConfig | None = None) -> list[str]:
    """Command-line arguments with credentials replaced (see `Redactor.override`); `cfg` adds
    the credentials of a config to those of the environment."""
    redactor = Redactor.of_config(cfg) if cfg is not None else Redactor()
    return redactor.overrides(lines)


@contextmanager
def redacted_argv(redactor: Redactor) -> Iterator[None]:
    """``sys.argv`` redacted while the block runs: W&B records the command line of a run when
    it starts it (W&B has no setting to leave the command line out but to leave out all system
    metadata). Restored afterwards: a DDP launcher starts its processes with ``sys.argv``."""
    saved = list(sys.argv)
    sys.argv[1:] = redactor.overrides(saved[1:])
    try:
        yield
    finally:
        sys.argv[:] = saved


def redact_yaml_file(path: Path, redactor: Redactor) -> None:
    """Rewrite a YAML file of Hydra (`Redactor.hydra_file`) in place, atomically."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    text = OmegaConf.to_yaml(OmegaConf.create(redactor.hydra_file(node)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _RedactedOverrides(logging.Filter):
    """Redacts the ``key=value`` words of a log message (Hydra's launcher logs each job's
    overrides as given)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split(" ")
        record.msg, record.args = " ".join(self.redactor.overrides(words)), ()
        return True


#: The logger of Hydra's local launcher, which lists each job's overrides on the console.
_LAUNCHER_LOG = "hydra._internal.core_plugins.basic_launcher"


class RedactHydraFiles(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``): Hydra writes
    ``.hydra/{config,hydra,overrides}.yaml`` and a sweep's ``multirun.yaml`` with the values as
    given; each job rewrites them redacted before the task runs, and a sweep once more at its
    end. The overrides the local launcher logs for each job are redacted too."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        log = logging.getLogger(_LAUNCHER_LOG)
        log.filters = [f for f in log.filters if not isinstance(f, _RedactedOverrides)]
        log.addFilter(_RedactedOverrides(Redactor.of_config(config)))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        redactor = Redactor.of_config(config)
        hydra = config.hydra
        if hydra.output_subdir is not None:
            folder = Path(hydra.runtime.output_dir) / str(hydra.output_subdir)
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                if (folder / name).is_file():
                    redact_yaml_file(folder / name, redactor)
        self._redact_sweep(config, redactor)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._redact_sweep(config, Redactor.of_config(config))

    @staticmethod
    def _redact_sweep(config: DictConfig, redactor: Redactor) -> None:
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if path.is_file():
            redact_yaml_file(path, redactor)
