"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from mtl.config import ConfigError
from mtl.data.base import DatasetError
from mtl.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        scores = train(cfg)
    except (ConfigError, DatasetError) as error:  # a report for the user, not a stack trace
        sys.exit(f"error: {error}")
    metric = cfg.get("optimized_metric")
    return scores.get(metric) if metric else None


if __name__ == "__main__":
    main()
