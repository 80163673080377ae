"""OmegaConf resolvers the configs in ``conf/`` use (registered when ``mtl`` is imported).

- ``${mtl.cwd:}``: the directory the program was started from. Hydra's own
  ``${hydra:runtime.cwd}`` is not set yet when Hydra resolves ``hydra.sweep.dir`` in a multirun,
  so every path that a sweep directory depends on must be resolvable without Hydra.
- ``${mtl.run_dir:DEFAULT}``: ``hydra.run.dir``: ``paths.output_dir`` when the config sets it,
  else DEFAULT. The run's log and Hydra's record then land in the folder given as
  ``paths.output_dir`` with its checkpoints and scores, not in a new dated folder per launch.
- ``${backbone_norm:NAME,mean|std}``: the input normalisation of timm model NAME's weights.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, ListConfig, OmegaConf

#: The working directory when ``mtl`` was first imported: the launch directory, since runs never
#: change directory (``hydra.job.chdir: false``).
_LAUNCH_DIR = os.getcwd()


def _backbone_norm(name: str, which: str) -> ListConfig:
    from mtl.models.pretrained import normalisation  # here: importing timm is slow

    # a ListConfig, not a list: OmegaConf.resolve (e.g. `--cfg job --resolve`) refuses lists
    return ListConfig(list(normalisation(name)[which]))


def _run_dir(default: str, *, _root_: DictConfig) -> str:
    paths = _root_.get("paths")
    given = OmegaConf.to_container(paths, resolve=False).get("output_dir") if paths else None
    # the default is Hydra's own folder (``${hydra:runtime.output_dir}``): not a choice
    if given is None or "hydra:runtime.output_dir" in str(given):
        return default
    return str(paths.output_dir)


def register_resolvers() -> None:
    """Register the resolvers above (idempotent)."""
    if not OmegaConf.has_resolver("mtl.cwd"):
        OmegaConf.register_new_resolver("mtl.cwd", lambda: _LAUNCH_DIR)
    if not OmegaConf.has_resolver("mtl.run_dir"):
        OmegaConf.register_new_resolver("mtl.run_dir", _run_dir)
    if not OmegaConf.has_resolver("backbone_norm"):
        OmegaConf.register_new_resolver("backbone_norm", _backbone_norm)
