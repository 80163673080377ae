"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from mtl.cli import reporting_errors, user_message
from mtl.train import train

__all__ = ["main", "user_message"]


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    scores = reporting_errors(lambda: train(cfg))
    metric = cfg.get("optimized_metric")
    if metric and metric not in scores:  # a sweeper must never receive None as the objective
        sys.exit(f"error: optimized_metric '{metric}' is not a score of this run: {sorted(scores)}")
    return scores[metric] if metric else None


if __name__ == "__main__":
    main()
