"""Re-alignment: after merging, fine-tune only the decoders on the training split for a few
steps, the merged encoder frozen (its BatchNorm statistics too). The dense-merging literature
(SIMO merging) finds task arithmetic adequate only after such a step.

A plain loop rather than a Lightning fit: a few hundred steps of one optimiser on frozen
features need no checkpointing, logging or balancer, and the loop is the whole method.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch

from mtl.module import MultiTaskModule


def realign_decoders(
    module: MultiTaskModule,
    datamodule: L.LightningDataModule,
    steps: int,
    lr: float,
    device: torch.device,
) -> list[float]:
    """Train the decoders of `module` for `steps` batches of the training split with AdamW at
    `lr`, each task's loss weighted as in training; returns the weighted total loss per step."""
    model = module.model.to(device)
    frozen = [p for p in model.backbone.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    heads = [p for head in model.decoders.values() for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(heads, lr=lr, weight_decay=0.0)
    model.train()
    model.backbone.eval()  # the merged statistics stay as they are
    losses = []
    batches = endless_batches(datamodule)
    try:
        for _ in range(steps):
            batch = next(batches)
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            preds = model(batch["image"], module.tasks)
            total = torch.stack(
                list(module.weighted(module.task_losses(preds, batch)).values())
            ).sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(float(total.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return losses


def endless_batches(datamodule: L.LightningDataModule, split: str = "train") -> Iterator[dict]:
    """The batches of the training split (or of ``holdout``, the part of it that
    ``data.val_fraction`` held out), epoch after epoch."""
    while True:
        yield from getattr(datamodule, f"{split}_dataloader")()
