"""Evaluate a checkpoint: ``python eval.py ckpt_path=PATH [key=value ...]``.

The same as ``train.py train=false``: the model and data are built from the config stored in
the checkpoint (command-line values win, see `mtl.eval_config`), the model is tested on the
validation split on one device and ``metrics.json`` gets ``test/<task>/<metric>`` keys, the
per-class tables, ``checkpoint/epoch`` and ``checkpoint/step`` and, with
``delta_m_baselines=NAME``, Δm.
"""

import sys

import hydra
from omegaconf import DictConfig

from mtl.cli import reporting_errors
from mtl.train import train

#: Overrides that turn the training config into an evaluation (given ones take precedence).
EVALUATION_OVERRIDES = ("train=false", "task_name=eval")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    reporting_errors(lambda: train(cfg))


def with_evaluation_overrides(argv: list[str]) -> list[str]:
    """``argv`` with the evaluation overrides put first, unless the user set those keys."""
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg}
    defaults = [o for o in EVALUATION_OVERRIDES if o.split("=", 1)[0] not in given]
    return [*defaults, *argv]


if __name__ == "__main__":
    sys.argv[1:] = with_evaluation_overrides(sys.argv[1:])
    main()
