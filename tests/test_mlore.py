"""The MLoRE decoder on tiny ViTs: shapes, routing, load balancing, single-task runs and the
inference re-parameterisation."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mtl.models.backbone import Backbone
from mtl.models.decoders.mlore import MLoRE, noisy_top_k
from mtl.models.multitask import MultiTaskModel

TASKS = {"semseg": 5, "depth": 1}
SMALL = dict(embed_dim=16, rank_list=[2, 3, 4, 5, 6], spe_rank=3, topk=3, load_balancing=0.5)


def tiny_vit(out_indices=(0, 1, 2, 3)) -> Backbone:
    return Backbone(
        "vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=4, embed_dim=32,
        num_heads=2, out_indices=out_indices, norm_last=True,
    )  # fmt: skip


def decoder(pre_softmax: bool = False, **kwargs) -> MLoRE:
    options = {**SMALL, **kwargs}
    return MLoRE([32] * 4, [8] * 4, TASKS, image_size=(32, 48), pre_softmax=pre_softmax,
                 **options)  # fmt: skip


FACTORY = partial(MLoRE, image_size=(32, 48), **SMALL)  # as the config builds it


def features(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 32, 4, 6, generator=generator) for _ in range(4)]


def test_model_with_mlore_predicts_every_task_at_input_size_from_a_x4_map():
    torch.manual_seed(0)
    model = MultiTaskModel(tiny_vit(), FACTORY, TASKS)
    images = torch.randn(2, 3, 32, 48)
    preds = model(images)
    assert {t: tuple(p.shape) for t, p in preds.items()} == {
        "semseg": (2, 5, 32, 48), "depth": (2, 1, 32, 48)}  # fmt: skip
    raw = model.decoders(dict.fromkeys(TASKS, model.backbone(images)))
    assert tuple(raw["semseg"].shape[-2:]) == (16, 24)  # the 4x6 token grid upsampled x4
    shared = {id(p) for p in model.decoders.shared_parameters()}
    assert id(model.decoders.first[0].experts[0].down.weight) in shared
    assert id(model.decoders.first[0].branches["depth"].router.spatial.weight) not in shared
    assert id(model.decoders.heads["depth"][0].weight) in {
        id(p) for p in model.decoders.task_parameters("depth")}  # fmt: skip


@pytest.mark.parametrize("pre_softmax", [True, False])
def test_top_k_keeps_k_experts_with_the_gates_of_each_mode(pre_softmax):
    logits = torch.randn(4, 10)  # 5 route logits, 5 noise scales
    gates = noisy_top_k(logits, 3, pre_softmax, training=False)
    assert ((gates > 0).sum(dim=1) == 3).all()
    route = logits[:, :5]
    kept = route.topk(3, dim=1).indices
    assert torch.equal(torch.sort((gates > 0).nonzero()[:, 1].reshape(4, 3)).values,
                       torch.sort(kept).values)  # fmt: skip
    probs = route.softmax(dim=1)
    if pre_softmax:  # softmax over the kept logits: sums to 1
        expected = route.gather(1, kept).softmax(dim=1)
        torch.testing.assert_close(gates.sum(dim=1), torch.ones(4))
    else:  # the kept softmax probabilities, not renormalised
        expected = probs.gather(1, kept)
        assert (gates.sum(dim=1) < 1 - 1e-3).all()
    torch.testing.assert_close(gates.gather(1, kept), expected)


def test_routing_noise_only_in_training_scaled_by_the_raw_scale_logits():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 6), torch.full((3, 6), -2.0)], dim=1)  # negative scales
    assert torch.equal(noisy_top_k(logits, 6, True, False), noisy_top_k(logits, 6, True, False))
    noisy = noisy_top_k(logits, 6, True, True)
    assert not torch.allclose(noisy, noisy_top_k(logits, 6, True, False))
    torch.manual_seed(1)
    first = noisy_top_k(logits, 6, True, True)
    torch.manual_seed(1)
    expected = (logits[:, :6] + torch.randn(3, 6) * -2.0).softmax(dim=1)
    torch.testing.assert_close(first, expected)
    quiet = torch.cat([logits[:, :6], torch.zeros(3, 6)], dim=1)  # zero scale: no noise
    torch.testing.assert_close(noisy_top_k(quiet, 6, True, True), logits[:, :6].softmax(dim=1))


def test_load_balancing_loss_is_the_weighted_cv2_split_among_the_tasks():
    torch.manual_seed(0)
    model = decoder(pre_softmax=True)
    model(dict.fromkeys(TASKS, features()))
    aux = model.auxiliary_losses()
    assert set(aux) == set(TASKS)
    expected = 0.0
    for gates in model._gates:  # 2 stacks x 4 levels
        load = torch.cat([gates["semseg"], gates["depth"]]).mean(dim=0)
        expected += (load.std() / load.mean()) ** 2
    assert len(model._gates) == 8
    for task in TASKS:
        torch.testing.assert_close(aux[task], 0.5 * expected / 2)
    assert aux["semseg"].grad_fn is not None and float(aux["semseg"].detach()) > 0
    model.load_balancing = 0.0
    assert model.auxiliary_losses() == {}


def test_multitask_model_adds_the_decoder_loss_to_each_task():
    torch.manual_seed(0)
    model = MultiTaskModel(tiny_vit(), FACTORY, TASKS)
    model(torch.randn(2, 3, 32, 48))
    aux = model.auxiliary_losses()
    torch.testing.assert_close(aux, model.decoders.auxiliary_losses())


def test_single_task_inference_runs_only_that_tasks_parts():
    torch.manual_seed(0)
    model = decoder()
    called = []
    for name, module in model.named_modules():
        if name.endswith(("branches.semseg", "branches.depth")) or name.startswith(
            ("masks.", "heads.")
        ):
            module.register_forward_pre_hook(lambda m, _, name=name: called.append(name))
    preds = model({"depth": features()})
    assert list(preds) == ["depth"]
    assert called and not [name for name in called if "semseg" in name]
    assert set(model.auxiliary_losses()) == {"depth"}


def test_another_input_size_is_refused_naming_the_configured_one():
    model = decoder()
    with pytest.raises(ValueError, match=r"configured for 32x48 inputs .*model.decoder.image_size"):
        model(dict.fromkeys(TASKS, [torch.randn(1, 32, 5, 6)] * 4))


@pytest.mark.parametrize("pre_softmax", [True, False])
def test_reparameterised_decoder_equals_the_original_in_eval_mode(pre_softmax):
    torch.manual_seed(0)
    model = decoder(pre_softmax=pre_softmax)
    for seed in range(3):  # BatchNorm statistics away from their initial values
        model(dict.fromkeys(TASKS, [f * 3 + 1 for f in features(seed)]))
    model.eval()
    inputs = dict.fromkeys(TASKS, features(7))
    with torch.no_grad():
        before = model(inputs)
        model.reparameterize()
        after = model(inputs)
    assert all(isinstance(head[1], torch.nn.Identity) for head in model.heads.values())
    for task in TASKS:
        assert before[task].abs().max() > 1e-2
        torch.testing.assert_close(after[task], before[task], atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()


def test_the_shared_conv_learns_from_a_detached_input():
    torch.manual_seed(0)
    model = decoder()
    seen = []
    model.first[0].shared.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    inputs = [f.requires_grad_() for f in features()]
    preds = model(dict.fromkeys(TASKS, inputs))
    sum(p.square().mean() for p in preds.values()).backward()
    assert seen and not any(x.requires_grad for x in seen)
    assert model.first[0].shared.weight.grad.abs().sum() > 0
    assert inputs[0].grad.abs().sum() > 0  # the rest of the block still trains what feeds it
