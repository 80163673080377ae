"""Predict on ordinary images: ``python predict.py ckpt_path=PATH input=DIR_OR_GLOB [output=DIR]``.

Runs the checkpoint's model on every image at the image's own size and writes, per task, a
picture (``<task>/<name>.png``) and the raw prediction (``<task>/<name>.npy``), plus
``overview/<name>.png``; see `mtl.predict`.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import reporting_errors
from mtl.config import ConfigError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    import torch

    from mtl.api import load
    from mtl.predict import check_images, find_images, predict_files

    missing = [key for key in ("ckpt_path", "input") if not cfg.get(key)]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: missing; python predict.py "
            "ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt input=DIR_OR_GLOB"
        )
    device = str(cfg.get("device") or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r}, but PyTorch sees no CUDA device; use device=cpu")
    paths = find_images(str(cfg.input))  # bad input is reported before the model is loaded
    check_images(paths)
    output = cfg.get("output") or HydraConfig.get().runtime.output_dir
    try:
        loaded = load(cfg.ckpt_path, map_location=device)
    except FileNotFoundError as error:
        raise ConfigError(f"ckpt_path: {error}") from None
    log.info("model of %s (epoch %d, step %d)", cfg.ckpt_path, loaded.epoch, loaded.step)
    predict_files(loaded, paths, output)


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from mtl.predict import PredictError

    reporting_errors(lambda: run(cfg), extra=(PredictError,))


if __name__ == "__main__":
    main()
