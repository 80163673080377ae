"""Representation regularisers: Rep-MTL's terms against their definitions, its gradient against
finite differences, in both balancer modes, and composed with balancers in training."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from mtl.config import ConfigError
from mtl.regularizers.rep_mtl import RepMTL, saliency_alignment, saliency_entropy
from mtl.tasks import get_task
from mtl.train import build_model, train


def _saliencies(tasks=3, batch=3, channels=4, size=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, *size, generator=g, dtype=torch.float64) for _ in range(tasks)
    ]


def test_saliency_entropy_is_the_mean_entropy_of_the_task_shares():
    s = _saliencies()
    batch, _, h, w = s[0].shape
    total = 0.0
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                mags = [abs(float(t[b, :, i, j].mean())) for t in s]
                shares = [m / sum(mags) for m in mags]
                total += -sum(p * math.log(p) for p in shares)
    assert float(saliency_entropy(s)) == pytest.approx(total / (batch * h * w), rel=1e-9)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.flatten() @ y.flatten()) / (x.norm() * y.norm()))


@pytest.mark.parametrize(
    "size", [(3, 2), (1, 2)], ids=["channels<=positions", "channels>positions"]
)
def test_saliency_alignment_matches_the_affinity_matrices(size):
    s, tau = _saliencies(size=size), 0.1
    batch = s[0].shape[0]
    flat = [[t[b].reshape(t.shape[1], -1) for t in s] for b in range(batch)]  # [b][t]: C x N
    anchors = [torch.stack([x.mean(dim=1) for x in flat[b]], dim=1) for b in range(batch)]  # C x T
    anchor_aff = [a @ a.T for a in anchors]
    losses = []
    for b in range(batch):
        negatives = [
            math.exp(_cos(anchor_aff[b], anchor_aff[k]) / tau) for k in range(batch) if k != b
        ]
        for x in flat[b]:
            positive = math.exp(_cos(anchor_aff[b], x @ x.T) / tau)
            losses.append(-math.log(positive / sum(negatives)))
    assert float(saliency_alignment(s, tau)) == pytest.approx(sum(losses) / len(losses), rel=1e-9)


def test_single_sample_batches_leave_the_contrastive_term_out():
    terms = RepMTL().terms([_saliencies(batch=1)])
    assert list(terms) == ["regularizer/tsr"]


# --------------------------------------------------------------------- gradients on a model
TASKS = ["semseg", "depth"]


def _model_and_batch(make_cfg):
    """A ViT with smooth heads, in float64: a saliency (a first derivative) of a ReLU network is
    piecewise constant in the weights, so finite differences need smooth activations."""
    cfg = make_cfg("regularizer=rep_mtl", f"data.tasks=[{','.join(TASKS)}]",
                   "model/backbone=vit_tiny", "model.backbone.out_indices=[5,11]")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(module, name, torch.nn.GELU())
    model = model.double().train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    batch = {
        "semseg": torch.randint(5, (3, 32, 32), generator=g),
        "depth": torch.rand(3, 1, 32, 32, generator=g, dtype=torch.float64) + 0.5,
    }
    return model, images, batch


def _regularizer_value(regularizer, model, images, batch) -> torch.Tensor:
    decoded = model.decode(images, TASKS, probe_features=True)
    losses = {t: get_task(t).loss(decoded.preds[t], batch[t]) for t in TASKS}
    return torch.stack(
        list(regularizer.terms(regularizer.saliencies(losses, decoded.probes)).values())
    ).sum()


def _gradients(regularizer, model, images, batch, detach: bool):
    decoded = model.decode(images, TASKS, detach_features=detach, probe_features=not detach)
    losses = {t: get_task(t).loss(decoded.preds[t], batch[t]) for t in TASKS}
    params = [p for p in model.parameters() if p.requires_grad]
    grads, values = regularizer.gradients(losses, decoded, params, model.shared_parameters())
    return params, grads, values


def test_the_gradient_matches_finite_differences_of_the_regulariser(make_cfg):
    model, images, batch = _model_and_batch(make_cfg)
    regularizer = RepMTL()
    params, grads, values = _gradients(regularizer, model, images, batch, detach=False)
    assert set(values) == {"regularizer/tsr", "regularizer/csa"}
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    predicted = sum(
        float((d * gr).sum()) for d, gr in zip(direction, grads, strict=True) if gr is not None
    )
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
    plus = float(_regularizer_value(regularizer, model, images, batch))
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * eps * d)
    minus = float(_regularizer_value(regularizer, model, images, batch))
    assert predicted == pytest.approx((plus - minus) / (2 * eps), rel=2e-3)
    shared = {id(p) for p in model.shared_parameters()}
    assert any(
        gr is not None and gr.abs().sum() > 0
        for p, gr in zip(params, grads, strict=True)
        if id(p) in shared
    )
    assert any(
        gr is not None and gr.abs().sum() > 0
        for p, gr in zip(params, grads, strict=True)
        if id(p) not in shared
    )


def test_rep_mode_carries_the_same_gradient_into_the_backbone(make_cfg):
    model, images, batch = _model_and_batch(make_cfg)
    regularizer = RepMTL()
    _, probed, _ = _gradients(regularizer, model, images, batch, detach=False)
    _, detached, _ = _gradients(regularizer, model, images, batch, detach=True)
    for a, b in zip(probed, detached, strict=True):
        if a is None:
            assert b is None or b.abs().max() == 0
        else:
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------- training
@pytest.mark.parametrize("balancer", [["balancer=equal"], ["balancer=pcgrad", "balancer.mode=rep"]],
                         ids=["equal", "pcgrad-rep"])  # fmt: skip
def test_training_with_rep_mtl_logs_its_terms(make_cfg, tmp_path, balancer):
    run = tmp_path / "run"
    cfg = make_cfg("regularizer=rep_mtl", *balancer, "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
                   "data.tasks=[semseg,depth,normals]", output_dir=run)  # fmt: skip
    scores = train(cfg)
    assert math.isfinite(scores["val/loss"])
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("regularizer/tsr")]
    assert len(rows) == 2
    assert all(float(r["regularizer/tsr"]) > 0 and float(r["regularizer/csa"]) != 0 for r in rows)


def test_a_task_aware_adapter_is_refused_before_building(make_cfg):
    cfg = make_cfg("regularizer=rep_mtl", "model/backbone=vit_tiny", "model/adapter=mtlora")
    with pytest.raises(ConfigError, match="regularizer: RepMTL needs one shared representation"):
        train(cfg)
