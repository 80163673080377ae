"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from mtl.config import ConfigError
from mtl.data.base import DatasetError
from mtl.models.pretrained import WeightsError
from mtl.numerics import NonFiniteError
from mtl.train import train


def user_message(error: Exception) -> str:
    """The error's own message; for one re-raised from a loader worker, without the worker's
    traceback that PyTorch puts in front of it."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text[text.rindex(marker) + len(marker) :].strip()
    return text


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        scores = train(cfg)
    except (ConfigError, DatasetError, NonFiniteError, WeightsError) as error:  # a report
        sys.exit(f"error: {user_message(error)}")
    metric = cfg.get("optimized_metric")
    if metric and metric not in scores:  # a sweeper must never receive None as the objective
        sys.exit(f"error: optimized_metric '{metric}' is not a score of this run: {sorted(scores)}")
    return scores[metric] if metric else None


if __name__ == "__main__":
    main()
