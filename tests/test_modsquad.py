"""Mod-Squad: routing, zero-initialised gates, the MI loss, the task batch, DDP exactness."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from modsquad_ddp_workers import all_reduce_worker, ddp_worker, gate_gradients

from mtl.models.adapters import ModSquad
from mtl.models.adapters.modsquad import ModSquadMlp, MoEAttention, TaskGate
from mtl.models.adapters.routing import grouped_linear, mutual_information_terms
from mtl.models.adapters.task_batch import TaskBatch
from mtl.models.backbone import Backbone
from mtl.models.decoders import ConvDecoder
from mtl.models.multitask import MultiTaskModel

TASKS = {"semseg": 3, "depth": 1, "sal": 1}


def modsquad_model(**options) -> MultiTaskModel:
    backbone = Backbone(
        "vit_tiny_patch16_224",  # 3 heads
        img_size=(32, 32),
        patch_size=8,
        depth=4,
        out_indices=[1, 3],
        dynamic_img_size=True,
    )
    torch.manual_seed(0)
    adapter = ModSquad(**{"mlp_experts": 8, "mlp_top_k": 2, **options})
    return MultiTaskModel(backbone, partial(ConvDecoder, hidden_channels=8), TASKS, adapter)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomise_gates(net: MultiTaskModel, std: float = 1.0) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "moe_gate" in name:
                p.normal_(0, std)


def test_mi_loss_matches_a_hand_computation():
    joint = torch.tensor([[0.3, 0.1, 0.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    eps = 1e-4
    p_t = [0.4 + eps, 0.6 + eps]
    p_e = [0.4 + eps, 0.3 + eps, 0.3 + eps]
    expected = [
        -sum(
            joint[t, e].item() * math.log(joint[t, e].item() / (p_t[t] * p_e[e]) + eps)
            for e in range(3)
        )
        for t in range(2)
    ]
    terms = mutual_information_terms(joint)
    torch.testing.assert_close(terms, torch.tensor(expected, dtype=torch.float64))
    # a table where experts say nothing about tasks has (about) zero mutual information, one
    # where they say everything has log 2
    independent = torch.full((2, 2), 0.25, dtype=torch.float64)
    assert abs(mutual_information_terms(independent).sum()) < 1e-3
    diagonal = torch.eye(2, dtype=torch.float64) / 2
    assert abs(mutual_information_terms(diagonal).sum() + math.log(2)) < 1e-3


def test_gate_records_the_weighted_mi_of_the_joint_table():
    batch = TaskBatch(["a", "b"])
    gate = TaskGate(2, num_experts=3, top_k=1, tasks=["a", "b"], task_batch=batch, mi_weight=0.5)
    with torch.no_grad():
        gate.moe_gate["a"].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    rows = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]])  # T=2, n=2
    with batch.run(["a", "b"], 1):
        experts, gates = gate(rows)
    probs = torch.stack([(rows[0] @ gate.moe_gate["a"].T).softmax(-1), torch.full((2, 3), 1 / 3)])
    probs = probs + 1e-4
    joint = probs.sum(1) / 4  # 4 routed tokens in all
    expected = 0.5 * mutual_information_terms(joint)
    torch.testing.assert_close(
        torch.stack([gate.balance_loss["a"], gate.balance_loss["b"]]), expected.float()
    )
    assert experts[0, :, 0].tolist() == [0, 1]
    torch.testing.assert_close(gates[0, :, 0], probs[0].max(-1).values)  # not renormalised


def test_routing_shapes_top_k_and_uniform_start():
    net = modsquad_model().eval()
    attn = [m for m in net.modules() if isinstance(m, MoEAttention)]
    mlps = [m for m in net.modules() if isinstance(m, ModSquadMlp)]
    assert len(attn) == 2 and len(mlps) == 2  # blocks 0, 2 and 1, 3
    assert attn[0].moe_q.shape == (6, 128, 192)  # 2 x 3 heads, head size 2 x 192 / 3
    assert mlps[0].experts.moe_w1.shape == (8, 384, 192)  # hidden: the MLP hidden 768 / top-2
    recorded = {}
    for layer in attn + mlps:
        layer.gate.register_forward_hook(lambda m, a, out: recorded.__setitem__(m, out))
    net(images())
    for layer, k in [(attn[0], 3), (mlps[0], 2)]:
        experts, gates = recorded[layer.gate]
        assert experts.shape == gates.shape == (3, 2 * 17, k)  # T, B x (16 patches + cls), k
        assert (experts.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
        e = layer.gate.num_experts
        torch.testing.assert_close(gates, torch.full_like(gates, 1 / e + 1e-4))  # zero gates
    for name, p in net.named_parameters():
        if "moe_gate" in name:
            assert not p.any(), name


def test_task_batch_equals_one_pass_per_task():
    """One forward over the T*B task batch computes what the reference's T passes compute."""
    net = modsquad_model().eval()
    randomise_gates(net)
    with torch.no_grad():
        together = net(images())
        for task in TASKS:
            alone = net(images(), [task])[task]
            torch.testing.assert_close(alone, together[task], rtol=1e-5, atol=1e-5)


def test_auxiliary_losses_are_the_gates_mi_terms_and_train_the_gates():
    net = modsquad_model().train()
    randomise_gates(net, 0.1)
    net(images())
    aux = net.auxiliary_losses()
    gates = [m for m in net.modules() if isinstance(m, TaskGate)]
    assert set(aux) == set(TASKS) and len(gates) == 4
    torch.testing.assert_close(aux["depth"], sum(g.balance_loss["depth"] for g in gates))
    sum(aux.values()).backward()
    assert all(g.moe_gate["sal"].grad.abs().sum() > 0 for g in gates)
    assert all(g.expert_usage.sum() > 0 for g in gates)  # the EMA of selections moved


def test_grouped_linear_equals_a_dense_reference():
    torch.manual_seed(0)
    weight = torch.randn(5, 4, 6)
    x, xs = torch.randn(7, 6), torch.randn(7, 3, 6)
    experts = torch.stack([torch.randperm(5)[:3] for _ in range(7)])
    shared, per_slot = grouped_linear(x, experts, weight), grouped_linear(xs, experts, weight)
    for n in range(7):
        for j in range(3):
            torch.testing.assert_close(shared[n, j], weight[experts[n, j]] @ x[n])
            torch.testing.assert_close(per_slot[n, j], weight[experts[n, j]] @ xs[n, j])


def test_modsquad_config_problems(make_cfg):
    from mtl.config import ConfigError, validate_config

    cfg = make_cfg("experiment=synthetic_vit_tiny_modsquad_equal", "model.adapter.mlp_top_k=9")
    with pytest.raises(ConfigError, match=r"model.adapter.mlp_top_k: 9; expected 1..mlp_experts"):
        validate_config(cfg)
    cfg = make_cfg("model/adapter=modsquad")  # the default backbone is a CNN
    with pytest.raises(ConfigError, match="model.adapter: modsquad needs a plain ViT backbone"):
        validate_config(cfg)


def test_the_sum_over_processes_is_exact_and_the_processes_exit_cleanly(tmp_path):
    # The worker checks the summed value and gradient, and that nothing keeps the process group
    # alive after destroy_process_group (an abort at exit fails a job that trained to the end).
    torch.multiprocessing.spawn(all_reduce_worker, args=(f"file://{tmp_path}/init",), nprocs=2)


def test_mi_loss_under_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    rows = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))
    torch.multiprocessing.spawn(
        ddp_worker, args=(f"file://{tmp_path}/init", rows, str(tmp_path / "g.pt")), nprocs=2
    )
    grads = torch.load(tmp_path / "g.pt")
    single = gate_gradients(rows, sync=True)
    torch.testing.assert_close(grads[True], single, rtol=1e-5, atol=1e-7)
    # each process's own table gives another loss and gradient (what sync_statistics=false does)
    assert (grads[False] - single).abs().max() > 1e-3 * single.abs().max()
