"""Pretrained backbone weights: where they come from (a local file, or the Hugging Face hub
cache read offline), how well they fit the model, and the input normalisation they expect.

timm loads weights non-strictly when it builds a feature extractor (the classifier is dropped,
so every other missing tensor goes unnoticed but for an INFO line) and stops with a torch error
on a shape mismatch. Here the file is read and converted to the model's layout with timm's own
functions, compared with the model tensor by tensor, and only then handed to timm.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

log = logging.getLogger(__name__)

FILE_KEY = "model.backbone.pretrained_file"
HUB_KEY = "model.backbone.pretrained"
#: Names shown per kind of problem in a message.
EXAMPLES = 3


class WeightsError(ValueError):
    """Pretrained weights that cannot be found, read or matched to the backbone."""


def normalisation(name: str) -> dict[str, tuple[float, ...]]:
    """``mean`` and ``std`` of the timm pretrained config of `name` (``arch`` or ``arch.tag``;
    no tag: timm's default weights); timm's ImageNet defaults for a model without one."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    mean = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return {"mean": tuple(float(m) for m in mean), "std": tuple(float(s) for s in std)}


# --------------------------------------------------------------------------- finding the file


def hub_cache() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, or ``HF_HOME``/hub, default
    ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_file(name: str) -> Path:
    """The cached weights of timm model `name` (``arch`` or ``arch.tag``), read offline."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(
            f"{HUB_KEY}: timm has no Hugging Face hub weights for '{name}'; give a local file "
            f"with {FILE_KEY}=PATH"
        )
    cache = hub_cache()
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    for filename in [*filenames, "model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(path, str):
            return Path(path)
    raise WeightsError(
        f"{HUB_KEY}: the weights {repo} are not in the Hugging Face cache {cache} (this run "
        f"never downloads); on a machine with internet run `hf download {repo}` and copy its "
        f"~/.cache/huggingface/hub to {cache} (or point HF_HUB_CACHE at the copy), or give a "
        f"local file with {FILE_KEY}=PATH"
    )


def weights_file(name: str, pretrained_file: str | None, pretrained: bool) -> Path | None:
    """The file to load: `pretrained_file` if given, else the hub cache's with `pretrained`,
    else None (random initialisation)."""
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise WeightsError(f"{FILE_KEY}: no file at '{path}'")
        return path
    return hub_file(name) if pretrained else None


# --------------------------------------------------------------------------- matching


@dataclass
class WeightsFit:
    """How a converted checkpoint fits a model: tensor names by outcome (classifier ignored)."""

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    #: name -> (checkpoint shape, model shape)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        total = len(self.matched) + len(self.missing) + len(self.mismatched)
        return (
            f"{len(self.matched)} of {total} backbone tensors matched, {len(self.missing)} "
            f"missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} of another shape"
        )

    def examples(self) -> str:
        """A few names of each problem, e.g. ``missing: a, b, c, ...``."""
        shapes = [
            f"{k} {list(file)} (model {list(model)})"
            for k, (file, model) in self.mismatched.items()
        ]
        parts = []
        for label, names in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("of another shape", shapes),
        ):
            if names:
                more = ", ..." if len(names) > EXAMPLES else ""
                parts.append(f"{label}: {', '.join(names[:EXAMPLES])}{more}")
        return "; ".join(parts)


def fit(
    state: Mapping[str, Tensor],
    model: nn.Module,
    ignore: Sequence[str] = (),
    used: Callable[[str], bool] = lambda key: True,
) -> WeightsFit:
    """Compare `state` with `model`'s state dict. Names under an `ignore` prefix are left out;
    model tensors that are not `used` (pruned by the feature extractor) are neither matched
    nor missing."""

    def kept(key: str) -> bool:
        return not any(key == p or key.startswith(p + ".") for p in ignore)

    model_state = model.state_dict()
    expected = {k: v for k, v in model_state.items() if kept(k) and used(k)}
    given = {k: v for k, v in state.items() if kept(k)}
    mismatched = {
        k: (tuple(v.shape), tuple(expected[k].shape))
        for k, v in given.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    }
    return WeightsFit(
        matched=[k for k in expected if k in given and k not in mismatched],
        missing=[k for k in expected if k not in given],
        unexpected=[k for k in given if k not in model_state],
        mismatched=mismatched,
    )


def used_by_features(
    name: str, feature_kwargs: Mapping[str, Any], **model_kwargs: Any
) -> Callable[[str], bool]:
    """Which state-dict names of the whole timm model `name` its feature extractor keeps (timm
    drops the head and the blocks after the last ``out_indices``). The extractor, built on the
    meta device, names them ``model.<name>`` (ViT-style getters) or with the first level
    flattened (``layers.0...`` -> ``layers_0...``)."""
    import torch

    with torch.device("meta"):
        features = timm.create_model(name, features_only=True, **feature_kwargs, **model_kwargs)
    kept = set(features.state_dict())

    def used(key: str) -> bool:
        return bool({key, f"model.{key}", key.replace(".", "_", 1)} & kept)

    return used


def _checkpoint_filter(model: nn.Module) -> Any:
    """The function timm applies to a checkpoint of `model`'s architecture before loading it
    (original releases' names, resampled position embeddings and patch kernels, resized
    relative-position tables). timm passes it privately to its builder; by timm's convention
    each architecture's module defines it as ``checkpoint_filter_fn``. None: no conversion."""
    return getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)


def checked_state(
    name: str,
    path: Path,
    strict: bool,
    key: str = FILE_KEY,
    feature_kwargs: Mapping[str, Any] | None = None,
    **model_kwargs: Any,
) -> dict[str, Tensor]:
    """The weights in `path` converted for timm model `name` (built with `model_kwargs`), with
    the model's own initial tensors where the file has none or another shape. Only tensors
    that the feature extractor (``features_only`` with `feature_kwargs`) keeps are required.

    Logs one INFO line with the counts of matched, missing, unexpected and mismatched tensors;
    an incomplete match raises `WeightsError` unless not `strict` (then a WARNING)."""
    from timm.models import load_state_dict

    try:
        raw = load_state_dict(str(path))
    except Exception as error:  # torch, safetensors and pickle raise many types
        raise WeightsError(f"{key}: cannot read '{path}' as weights ({error})") from None
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    convert = _checkpoint_filter(model)
    try:
        state = convert(raw, model) if convert else raw
    except Exception as error:  # a checkpoint of another architecture may break the filter
        raise WeightsError(
            f"{key}: '{path}' cannot be converted to the layout of {name} by timm ({error!r})"
        ) from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    ignore = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    try:
        used = used_by_features(name, feature_kwargs or {}, **model_kwargs)
    except Exception:  # a model that cannot be built on the meta device: require every tensor
        used = None
    result = fit(state, model, ignore, used or (lambda key: True))
    where = f"{key}: '{path}'"
    if not result.complete and strict:
        raise WeightsError(
            f"{where} does not fit {name}: {result.summary()} ({result.examples()}); give the "
            f"weights of this architecture, or load the matching part with "
            f"model.backbone.pretrained_strict=false"
        )
    if not result.complete:
        log.warning("%s loaded partially into %s: %s (%s)", where, name, result.summary(),
                    result.examples())  # fmt: skip
    else:
        log.info("pretrained weights %s: %s", path, result.summary())
    # The whole model's state, so timm's own conversion sees a complete checkpoint of its
    # layout (the filters recognise it and leave it as it is) when it builds the extractor.
    model.load_state_dict({k: state[k] for k in result.matched}, strict=False)
    return model.state_dict()
