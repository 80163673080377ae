"""Training-only tasks and SBCB's semantic-boundary task: boundary targets, loss, head, model
wiring, and a run in which the task trains but appears in no report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from mtl.data.boundaries import boundary_targets, semantic_boundaries
from mtl.losses import multilabel_edge_bce
from mtl.models.aux_heads import CASENetHead


def _square_ring() -> np.ndarray:
    """The pixels within Euclidean distance 2 of the edge of the square [6:14, 6:14] of a
    20x20 map, on both sides: 2 rows/columns inside, 2 outside, and the 4 diagonal pixels
    (distance sqrt(2)) off the corners."""
    ring = np.zeros((20, 20), dtype=np.uint8)
    ring[4:16, 6:14] = 1
    ring[6:14, 4:16] = 1
    for r, c in [(5, 5), (5, 14), (14, 5), (14, 14)]:
        ring[r, c] = 1
    ring[8:12, 8:12] = 0  # 3 or more pixels inside
    return ring


def test_square_boundary_is_the_ring_of_radius_2_on_both_sides():
    labels = torch.zeros(20, 20, dtype=torch.int64)
    labels[6:14, 6:14] = 1
    target = boundary_targets(labels, num_classes=3)
    assert target.dtype == torch.uint8 and target.shape == (3, 20, 20)
    ring = _square_ring()
    np.testing.assert_array_equal(target[1].numpy(), ring)  # the square's class
    np.testing.assert_array_equal(target[0].numpy(), ring)  # the background's: the same band
    assert not target[2].any()  # a class absent from the map


def test_ignore_label_is_no_class_and_no_boundary():
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[6:14, 6:14] = 1
    labels[:, 14:] = 255  # the square's right side touches a wide ignore region
    out = semantic_boundaries(labels, num_classes=2)
    assert out.shape == (2, 20, 20)
    assert not out[1, 8:12, 12:].any()  # no band along the ignore side, inside or outside
    np.testing.assert_array_equal(out[1, 8:12, 4:8], 1)  # the left side keeps both bands


def _reference(labels: np.ndarray, num_classes: int, radius: float = 2) -> np.ndarray:
    """The rule of py-edge-eval's mask2bdry on the whole image with SciPy."""
    out = np.zeros((num_classes, *labels.shape), dtype=np.uint8)
    ignore = labels == 255
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            dist = distance_transform_edt(mask | ignore) + distance_transform_edt(~mask)
            out[c] = (dist > 0) & (dist <= radius)
    return out


def test_boundaries_match_the_rule_on_the_whole_image():
    """OpenCV distances on per-class windows give the rule's result exactly."""
    generator = np.random.default_rng(0)
    blocks = generator.integers(0, 5, size=(12, 16))
    blocks[generator.random((12, 16)) < 0.1] = 255
    labels = np.kron(blocks, np.ones((5, 5), dtype=np.int64))[:57, :75]
    np.testing.assert_array_equal(semantic_boundaries(labels, 5), _reference(labels, 5))


def test_targets_are_computed_after_augmentation_in_the_loader(make_cfg):
    """The train transform of the datamodule adds the boundaries of the augmented class map;
    semseg, loaded only for them, leaves the sample (and is not added to validation)."""
    from mtl.data.derived import DerivedTargets
    from mtl.train import build_datamodule

    cfg = make_cfg("data.tasks=[depth]", "data.aux_tasks=[sem_boundary]")
    datamodule = build_datamodule(cfg.data)
    assert datamodule.tasks == ["depth", "semseg"]
    transform = datamodule.train_transform
    assert isinstance(transform, DerivedTargets)
    labels = np.zeros((48, 64), np.uint8)
    labels[10:30, 5:25] = 3
    sample = {
        "image": np.full((48, 64, 3), 128, np.uint8),
        "semseg": labels,
        "depth": np.ones((48, 64), np.float32),
        "meta": {"id": "a", "orig_size": (48, 64), "pad": (0, 0, 0, 0)},
    }
    torch.manual_seed(3)
    out = transform(dict(sample))
    assert set(out) == {"image", "depth", "sem_boundary", "meta"}
    torch.manual_seed(3)  # the same random scale, crop and flip without the derived target
    augmented = transform.transform(dict(sample))["semseg"]
    assert not torch.equal(augmented, torch.from_numpy(labels).long())  # it was augmented
    torch.testing.assert_close(out["sem_boundary"], boundary_targets(augmented, 5))
    assert "semseg" not in datamodule.val_transform(dict(sample))


def test_multilabel_edge_loss_balances_positives_per_image():
    logits = torch.zeros(2, 2, 2, 2)  # [fused; last] of K=1, two images
    target = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    target[0, 0, 0, 0] = 1  # image 0: 1 positive, 3 negatives -> positive weight 3
    # image 0: (3 ln2 + 3 ln2) / 4; image 1 (no positive): ln2; mean, on two outputs
    expected = 2 * (1.5 * math.log(2) + math.log(2)) / 2
    assert multilabel_edge_bce(logits, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("channels", "strides"), [([8, 16, 32], [4, 8, 16]), ([12, 12, 12], [16, 16, 16])]
)
def test_casenet_head_outputs_fused_and_last_at_the_input_size(channels, strides):
    head = CASENetHead(in_channels=channels, in_strides=strides, out_channels=4, norm="none")
    features = [torch.randn(2, c, 48 // s, 64 // s) for c, s in zip(channels, strides, strict=True)]
    out = head(features, (48, 64))
    assert out.shape == (2, 8, 48, 64)
    # the fusion is per class: weight 1 on last_k, 0 on the sides -> fused == last
    with torch.no_grad():
        head.fuse.weight.zero_()
        head.fuse.weight[:, 0] = 1
        head.fuse.bias.zero_()
    fused, last = head(features, (48, 64)).chunk(2, dim=1)
    torch.testing.assert_close(fused, last)


def test_model_runs_the_aux_head_only_when_asked():
    from functools import partial

    from mtl.models.backbone import Backbone
    from mtl.models.decoders import ConvDecoder
    from mtl.models.multitask import MultiTaskModel

    model = MultiTaskModel(
        Backbone("resnet18", pretrained=False),
        partial(ConvDecoder, hidden_channels=8),
        {"semseg": 3},
        aux_heads={"sem_boundary": partial(CASENetHead, out_channels=3)},
    )
    images = torch.randn(2, 3, 32, 32)
    assert list(model(images)) == ["semseg"]  # default: the reported tasks
    preds = model.decode(images, ["semseg", "sem_boundary"]).preds
    assert preds["sem_boundary"].shape == (2, 6, 32, 32)
    head = {id(p) for p in model.aux_heads.parameters()}
    assert {id(p) for p in model.task_parameters()["sem_boundary"]} == head
    assert not head & {id(p) for p in model.shared_parameters()}


#: The one run of the file: two tasks and the training-only one, TensorBoard (scalars and
#: prediction images) and the exported predictions.
AUX_RUN = [
    "data.tasks=[semseg,depth]",
    "data.aux_tasks=[sem_boundary]",
    "logger=tensorboard",
    "save_predictions=true",
    "model/decoder=conv",
    "model.decoder.hidden_channels=8",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
]
#: Where the task's name may appear: its training loss, its balancer weight and the gradient
#: statistics of balancing (``diagnostics_every_n_steps``), all training-time values.
ALLOWED = {b"train/sem_boundary/loss", b"balancer/sem_boundary/weight"}
GRADIENTS = rb"grad/(cos/\w+-sem_boundary|cos/sem_boundary-\w+|sem_boundary/norm)"


def json_total(run: Path) -> int:
    """The parameter count a run reports."""
    return json.loads((run / "metrics.json").read_text())["params/total"]


def test_training_only_task_trains_and_is_in_no_report(make_cfg, tmp_path):
    import re

    import mtl
    from mtl.checkpoint import IncompatibleCheckpointError, check_compatible, model_signature
    from mtl.train import train

    run = tmp_path / "run"
    scores = train(make_cfg(*AUX_RUN, output_dir=run))
    assert not [key for key in scores if "sem_boundary" in key]

    names, logged = [], set()
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        if path.suffix == ".ckpt" or path.name in ("config.yaml", "hparams.yaml"):
            continue  # the run's settings and the weights to resume from
        found = set(re.findall(rb"[\w./-]*sem_boundary[\w./-]*", path.read_bytes()))
        found = {name for name in found if not re.fullmatch(GRADIENTS, name)}
        logged |= found & ALLOWED
        if found - ALLOWED:
            names.append(f"{path.relative_to(run)}: {sorted(found - ALLOWED)}")
    assert not names, names
    assert logged == ALLOWED  # it trained: loss and balancer weight logged
    assert (run / "predictions").is_dir() and list((run / "tensorboard").iterdir())

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    head_keys = [k for k in checkpoint["state_dict"] if k.startswith("model.aux_heads.")]
    assert head_keys  # kept for resuming, which needs the same training-only tasks:
    plain = make_cfg(*[o for o in AUX_RUN if "aux_tasks" not in o], output_dir=run)
    with pytest.raises(IncompatibleCheckpointError, match=r"aux_tasks: checkpoint \['sem_bo"):
        check_compatible(checkpoint, model_signature(plain, json_total(run)))
    loaded = mtl.load(run / "checkpoints" / "last.ckpt")
    assert loaded.tasks == ["semseg", "depth"]
    assert not any("aux_heads" in name for name, _ in loaded.model.named_parameters())
    assert sum(p.numel() for p in loaded.model.parameters()) == json_total(run)
    assert set(loaded.predict(np.zeros((40, 50, 3), np.uint8))) == set(loaded.tasks)
