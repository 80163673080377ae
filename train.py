"""Train a multi-task model: ``python train.py [experiment=NAME] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from mtl.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    scores = train(cfg)
    metric = cfg.get("optimized_metric")
    return scores.get(metric) if metric else None


if __name__ == "__main__":
    main()
