"""`python -m mtl.extract`: a single-task model with the used experts of a MoE checkpoint."""

from __future__ import annotations

import pytest
import torch

import mtl
from mtl.checkpoint import CONFIG_KEY, SIGNATURE_KEY, model_signature
from mtl.config import ConfigError
from mtl.extract import run
from mtl.redact import resolved_config
from mtl.train import build_module, count_parameters, train

ADAPTERS = {
    "modsquad": ["model.adapter.attn_experts=12", "model.adapter.mlp_experts=8"],
    "moe": ["model.adapter.num_experts=8"],
}


def routed_checkpoint(make_cfg, tmp_path, adapter: str) -> tuple[str, torch.nn.Module]:
    """A checkpoint as train.py writes it, of a model whose routers are rank one (logits
    ``s_e * u.x``: a token picks the experts of largest or of smallest s_e, so some experts are
    never used), with the expert usage of one training-mode forward pass."""
    cfg = make_cfg(f"experiment=synthetic_vit_tiny_{adapter}_equal", *ADAPTERS[adapter])
    torch.manual_seed(0)
    module = build_module(cfg)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "moe_gate" in name or "moe_router" in name:
                p.copy_(torch.linspace(-1, 1, p.shape[0])[:, None] * torch.randn(p.shape[1]))
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    module.model.train()(images)
    state = {
        "state_dict": module.state_dict(),
        CONFIG_KEY: resolved_config(cfg),
        SIGNATURE_KEY: model_signature(cfg, count_parameters(module.model)["params/total"]),
        "epoch": 0,
        "global_step": 1,
    }
    path = tmp_path / "full.ckpt"
    torch.save(state, path)
    return str(path), module.model.eval()


@pytest.mark.parametrize("adapter", ["modsquad", "moe"])
def test_extracted_model_computes_the_full_models_task_with_fewer_parameters(
    make_cfg, tmp_path, adapter
):
    path, full = routed_checkpoint(make_cfg, tmp_path, adapter)
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(images)["semseg"]
    # thresh=0 keeps every expert the task used; thresh=-1 keeps every expert
    used_path = run([f"ckpt_path={path}", "task=semseg", "thresh=0"])
    used = mtl.load(used_path)
    every = mtl.load(run([f"ckpt_path={path}", "task=semseg", "thresh=-1", f"output={path}.all"]))
    assert used.tasks == every.tasks == ["semseg"]
    with torch.no_grad():
        torch.testing.assert_close(used.model(images)["semseg"], expected)
        assert torch.equal(every.model(images)["semseg"], expected)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (used.model, every.model, full)]
    assert sizes[0] < sizes[1] < sizes[2]
    if adapter == "modsquad":  # eval.py (train=false) scores the one-task checkpoint
        scores = train(make_cfg("train=false", f"ckpt_path={used_path}"))
        assert "test/semseg/mIoU" in scores and not any("depth" in k for k in scores)


def test_extract_reports_bad_input(tmp_path):
    path = tmp_path / "plain.ckpt"
    stored = {"model": {"backbone": {}, "adapter": {}}, "data": {"tasks": ["semseg"]}}
    torch.save({CONFIG_KEY: stored, "state_dict": {}}, path)
    with pytest.raises(ConfigError, match="task: 'nope' is not a task of the checkpoint"):
        run([f"ckpt_path={path}", "task=nope"])
    with pytest.raises(ConfigError, match="task: missing"):
        run([f"ckpt_path={path}"])
    with pytest.raises(ConfigError, match="ckpt_path: no checkpoint file"):
        run([f"ckpt_path={tmp_path}/none.ckpt", "task=semseg"])
    with pytest.raises(ConfigError, match="'thresh': expected key=value"):
        run([f"ckpt_path={path}", "task=semseg", "thresh"])
