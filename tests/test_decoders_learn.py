"""A short training run per decoder of the TaskExpert/ASPP family lowers every task's validation
loss well below that of the untrained model (synthetic scenes, 48x64, CPU)."""

import lightning as L
import pytest

from mtl.train import build_datamodule, build_module, train

SHORT = (
    "model.decoder.hidden_channels=64",
    "model.backbone.out_indices=[1,2]",  # ResNet-18 to stride 8: ASPP reads 6x8, not 2x2
    "trainer.max_epochs=5",
    "trainer.check_val_every_n_epoch=5",
    "optim.optimizer.lr=5e-3",
    "optim.scheduler.warmup_steps=2",
)


def _untrained_validation_losses(cfg) -> dict[str, float]:
    L.seed_everything(cfg.seed)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


@pytest.mark.parametrize("decoder", ["aspp", "taskexpert"])
def test_short_run_lowers_every_validation_loss(make_cfg, decoder):
    cfg = make_cfg(f"model/decoder={decoder}", *SHORT)
    before = _untrained_validation_losses(cfg)
    scores = train(cfg)
    for task in cfg.data.tasks:
        key = f"val/{task}/loss"
        assert scores[key] < 0.8 * before[key], f"{key}: {before[key]:.4f} -> {scores[key]:.4f}"
