"""Merging methods on tiny state dicts, against hand-computed results and their properties."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtl.merging.averaging import WeightAveraging
from mtl.merging.breadcrumbs import Breadcrumbs
from mtl.merging.consensus import Consensus, pack_masks, reconstruct, tall_masks
from mtl.merging.dare import Dare, drop_and_rescale
from mtl.merging.lines import LiNeS, block_index
from mtl.merging.pcb import PCB
from mtl.merging.task_arithmetic import TaskArithmetic
from mtl.merging.task_vectors import (
    MergeError,
    add,
    first_difference,
    task_vector,
    top_magnitude_mask,
    trim,
)
from mtl.merging.ties import Ties

T = torch.tensor
BASE = {"w": T([[1.0, 1.0], [1.0, 1.0]]), "b": T([0.0, 0.0])}
# two tasks: τ_1 = w [[2, -1], [0.5, 0]], b [1, -3]; τ_2 = w [[-1, 3], [0.5, 0]], b [-2, 1]
TUNED = [
    {"w": T([[3.0, 0.0], [1.5, 1.0]]), "b": T([1.0, -3.0])},
    {"w": T([[0.0, 4.0], [1.5, 1.0]]), "b": T([-2.0, 1.0])},
]


def vectors() -> list[dict[str, torch.Tensor]]:
    return [task_vector(t, BASE) for t in TUNED]


def close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_averaging_and_task_arithmetic_by_hand():
    tv = vectors()
    close(
        add(BASE, WeightAveraging()(BASE, tv)),
        {"w": T([[1.5, 2.0], [1.5, 1.0]]), "b": T([-0.5, -1.0])},
    )
    close(TaskArithmetic(0.5)(BASE, tv), {"w": T([[0.5, 1.0], [0.5, 0.0]]), "b": T([-0.5, -1.0])})


def test_task_arithmetic_one_task_at_one_is_the_finetuned_model():
    close(add(BASE, TaskArithmetic(1.0)(BASE, vectors()[:1])), TUNED[0])


def test_top_magnitude_mask_keeps_exactly_k():
    x = T([[0.1, -5.0, 2.0, -0.3, 4.0]])
    assert top_magnitude_mask(x, 0.4).tolist() == [[False, True, False, False, True]]
    assert top_magnitude_mask(x, 1.0).all() and not top_magnitude_mask(x, 0.1).any()


def test_ties_global_dis_sum_and_dis_mean_by_hand():
    # flattened (w then b): τ_1 = [2, -1, .5, 0, 1, -3], τ_2 = [-1, 3, .5, 0, -2, 1]
    # k = 0.5 keeps 3 of 6 per task: τ̂_1 = [2, 0, 0, 0, 1, -3], τ̂_2 = [0, 3, 0, 0, -2, 1]
    # sum [2, 3, 0, 0, -1, -2] → signs [+, +, maj, maj, -, -]; majority sign of the signs: 0
    # → zero entries stay 0; agreeing: [2, 3, 0, 0, -2, -3]
    tv = vectors()
    summed = Ties(k=0.5, scaling=1.0, aggregate="sum")(BASE, tv)
    close(summed, {"w": T([[2.0, 3.0], [0.0, 0.0]]), "b": T([-2.0, -3.0])})
    mean = Ties(k=0.5, scaling=2.0, aggregate="mean")(BASE, tv)
    close(mean, {"w": T([[4.0, 6.0], [0.0, 0.0]]), "b": T([-4.0, -6.0])})
    # both agree on the sign at b[0] only when τ_1 b[0] is not kept... dis-mean halves shared
    both = Ties(k=1.0, scaling=1.0, aggregate="mean")(BASE, tv)
    # k = 1: sum [1, 2, 1, 0, -1, -2] → signs [+, +, +, maj(+), -, -]
    close(both, {"w": T([[2.0, 3.0], [0.5, 0.0]]), "b": T([-2.0, -3.0])})


def test_ties_per_tensor_trim_ranks_within_each_tensor():
    # k = 0.5 per tensor: w keeps 2 of 4, b keeps 1 of 2
    kept = trim(vectors(), 0.5, "tensor")
    close(kept[0], {"w": T([[2.0, -1.0], [0.0, 0.0]]), "b": T([0.0, -3.0])})
    close(kept[1], {"w": T([[-1.0, 3.0], [0.0, 0.0]]), "b": T([-2.0, 0.0])})


def test_ties_one_task_all_kept_is_the_finetuned_model():
    for aggregate in ("sum", "mean"):
        merged = Ties(k=1.0, scaling=1.0, aggregate=aggregate)(BASE, vectors()[:1])
        close(add(BASE, merged), TUNED[0])


def test_dare_drops_with_a_fixed_seed_and_rescales():
    tv = [{"x": torch.ones(10_000)}]
    once = drop_and_rescale(tv, 0.75, True, seed=3)[0]["x"]
    again = drop_and_rescale(tv, 0.75, True, seed=3)[0]["x"]
    assert torch.equal(once, again)
    assert set(once.unique().tolist()) == {0.0, 4.0}
    assert abs(float((once > 0).float().mean()) - 0.25) < 0.02  # Bernoulli(1 - p) kept
    # p = 0 is the plain method; the nested method receives the dropped vectors
    close(Dare(TaskArithmetic(0.5), p=0.0)(BASE, vectors()), TaskArithmetic(0.5)(BASE, vectors()))
    merged = Dare(Ties(k=1.0, scaling=1.0), p=0.75, seed=3)(BASE, tv and vectors())
    dropped = drop_and_rescale(vectors(), 0.75, True, seed=3)
    close(merged, Ties(k=1.0, scaling=1.0)(BASE, dropped))


def test_breadcrumbs_by_hand_and_small_tensor_guard():
    tv = [{"x": T([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -10.0])}]
    # β = 0.2 drops the 2 smallest, γ = 0.9 drops the top 1: ranks 2..8 kept
    merged = Breadcrumbs(beta=0.2, gamma=0.9, scaling=1.0)(BASE, tv)
    close(merged, {"x": T([0, 0, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, 0])})
    # per tensor at γ = 0.99: a 2-entry bias has no top 1% to drop and keeps its largest entry
    small = Breadcrumbs(beta=0.5, gamma=0.99, scaling=1.0, scope="tensor")(
        BASE, [{"b": T([0.5, -2.0])}]
    )
    close(small, {"b": T([0.0, -2.0])})


def test_tall_masks_consensus_and_compression_by_hand():
    tv = vectors()
    merged = TaskArithmetic(1.0)(BASE, tv)  # τ_MTL = [1, 2, 1, 0 | -1, -2]
    masks = tall_masks(tv, merged, [1.0, 1.0])
    # task 1: |τ| [2, 1, .5, 0, 1, 3] > |τ_MTL - τ| [1, 3, .5, 0, 2, 1]
    assert masks[0]["w"].flatten().tolist() == [True, False, False, False]
    assert masks[0]["b"].tolist() == [False, True]
    # task 2: |τ| [1, 3, .5, 0, 2, 1] > [2, 1, .5, 0, 1, 3]
    assert masks[1]["w"].flatten().tolist() == [False, True, False, False]
    assert masks[1]["b"].tolist() == [True, False]
    # k = 1: entries some task uses; k = 2: none here; k = 0: the base method
    one = Consensus(TaskArithmetic(1.0), k=1, mask_lambda=1.0, scaling=1.0)(BASE, tv)
    close(one, {"w": T([[1.0, 2.0], [0.0, 0.0]]), "b": T([-1.0, -2.0])})
    two = Consensus(TaskArithmetic(1.0), k=2, mask_lambda=1.0, scaling=1.0)(BASE, tv)
    assert all(float(v.abs().sum()) == 0 for v in two.values())
    zero = Consensus(TaskArithmetic(1.0), k=0, mask_lambda=0.4, scaling=0.3)(BASE, tv)
    close(zero, TaskArithmetic(0.3)(BASE, tv))
    packed = pack_masks(masks)
    close(
        reconstruct(BASE, merged, packed[0]),
        {"w": T([[2.0, 1.0], [1.0, 1.0]]), "b": T([0.0, -2.0])},
    )


def test_pcb_without_clipping_by_hand():
    tv = [{"x": T([1.0, -2.0, 3.0, 4.0])}, {"x": T([2.0, 2.0, -1.0, 4.0])}]
    # Σ τ = [3, 0, 2, 8]; inter = tanh(τ_t ⊙ Σ): task 1 [t3, 0, t6, t32], task 2 [t6, 0, -t2, t32]
    # intra = exp(2 Norm(|τ_t|)²): task 1 |τ| [1,2,3,4] → Norm [0, 1/3, 2/3, 1]
    #                              task 2 |τ| [2,2,1,4] → Norm [1/3, 1/3, 0, 1]
    # ratio 0.5: each row clamped below its 2nd smallest (index int(4·0.5) = 2 → 3rd smallest)
    tanh, exp = torch.tanh, torch.exp
    w1 = T(
        [
            float(exp(T(0.0)) * tanh(T(3.0))),
            0.0,
            float(exp(T(2 * 4 / 9)) * tanh(T(6.0))),
            float(exp(T(2.0)) * tanh(T(32.0))),
        ]
    )
    w2 = T(
        [
            float(exp(T(2 / 9)) * tanh(T(6.0))),
            0.0,
            float(exp(T(0.0)) * tanh(T(-2.0))),
            float(exp(T(2.0)) * tanh(T(32.0))),
        ]
    )

    def dropped(w):
        floor = w.sort().values[2]
        c = w.clamp(min=floor)
        return (c - c.min()) / (c.max() - c.min())

    b1, b2 = dropped(w1), dropped(w2)
    expected = (b1 * tv[0]["x"] + b2 * tv[1]["x"]) / (b1 + b2).clamp(min=1e-12)
    merged = PCB(ratio=0.5, scaling=1.0, clip=0.0)(BASE, tv)
    torch.testing.assert_close(merged["x"], expected)
    assert merged["x"][3] == 4.0 and merged["x"][0] == 0.0  # only the top entries survive


def test_lines_block_scaling_and_identity():
    names = [
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.2.norm1.weight",
        "norm.weight",
    ]
    base = {n: torch.zeros(2) for n in names}
    tv = [{n: torch.ones(2) for n in names}]
    merged = LiNeS(TaskArithmetic(1.0), alpha=0.2, beta=0.6)(base, tv)
    assert [float(merged[n][0]) for n in names] == pytest.approx([0.2, 0.2, 0.5, 0.8, 0.2])
    close(LiNeS(TaskArithmetic(0.3), alpha=1.0, beta=0.0)(base, tv), TaskArithmetic(0.3)(base, tv))
    # the automatic α for TA at λ = 1 is 1/T
    two = [tv[0], tv[0]]
    auto = LiNeS(TaskArithmetic(1.0), beta=0.0)(base, two)
    assert float(auto["norm.weight"][0]) == pytest.approx(1.0)  # (1/2)·2


def test_block_index_flattens_stages():
    swin = ["layers.0.blocks.0.a", "layers.0.blocks.1.a", "layers.1.blocks.0.a", "norm.w"]
    index, count = block_index(swin)
    assert count == 3 and index == {
        "layers.0.blocks.0.a": 0,
        "layers.0.blocks.1.a": 1,
        "layers.1.blocks.0.a": 2,
    }
    resnet = [
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer1.1.conv1.weight",
        "layer2.0.conv1.weight",
    ]
    index, count = block_index(resnet)
    assert count == 3 and index["layer2.0.conv1.weight"] == 2


def test_first_difference_names_the_tensor():
    other = {"w": BASE["w"], "b": torch.zeros(3)}
    assert first_difference(BASE, other) == "b has shape (3,), expected (2,)"
    assert first_difference(BASE, {"w": BASE["w"]}) == "b is missing"
    assert first_difference(BASE, dict(BASE)) is None


class _Toy(torch.nn.Module):
    """A 1x1-conv 'encoder' whose output is every task's prediction, as a module would hold it."""

    def __init__(self, tasks: list[str], channels: int, inputs: int = 1) -> None:
        super().__init__()
        self.backbone = torch.nn.Conv2d(inputs, channels, 1, bias=False)
        self.tasks = tasks

    @property
    def model(self):
        return self

    def forward(self, images, tasks):
        return {t: self.backbone(images) for t in tasks}

    def weighted(self, losses):
        return losses


def _batches(target: float, inputs: int = 1):
    images = torch.rand(4, inputs, 3, 3) + 0.5
    while True:
        yield {"image": images, "depth": target * images[:, :1]}


def test_learned_coefficients_fit_a_known_optimum_and_start_from_init():
    from mtl.merging.adamerging import LearnedCoefficients

    toy = _Toy(["depth"], 1)
    base = {"backbone.weight": torch.zeros(1, 1, 1, 1)}
    tv = [{"backbone.weight": torch.ones(1, 1, 1, 1)}]
    # depth = λ·x against a target 2·x (L1): the optimum is λ = 2 (no clamp)
    method = LearnedCoefficients(
        granularity="task", init=0.0, objective="supervised", steps=150, lr=0.05, clamp=False
    )
    merged = method.learn(base, tv, toy, _batches(2.0), torch.device("cpu"))
    assert float(merged["backbone.weight"]) == pytest.approx(2.0, abs=0.05)
    close(LearnedCoefficients(init=0.3)(base, tv), TaskArithmetic(0.3)(base, tv))


def test_entropy_sharpens_a_classification_head_up_to_the_clamp():
    from mtl.merging.adamerging import LearnedCoefficients, prediction_entropy

    uniform = torch.zeros(1, 5, 2, 2)
    assert float(prediction_entropy(uniform, "labels")) == pytest.approx(torch.log(T(5.0)).item())
    assert float(prediction_entropy(torch.zeros(1, 1, 2, 2), "probability")) == pytest.approx(
        torch.log(T(2.0)).item()
    )
    toy = _Toy(["semseg"], 2)
    base = {"backbone.weight": torch.zeros(2, 1, 1, 1)}
    tv = [{"backbone.weight": T([4.0, -4.0]).reshape(2, 1, 1, 1)}]  # larger λ: surer logits
    method = LearnedCoefficients(
        granularity="tensor", init=0.3, objective="entropy", steps=60, lr=0.05
    )
    method.learn(base, tv, toy, _batches(0.0), torch.device("cpu"))
    assert method.coefficients.tolist() == [[1.0]]  # clamped at 1


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_ties_equals_fusionbench_when_installed(aggregate):
    """FusionBench as an oracle (a test-only dependency, skipped without it). Its trim keeps
    ⌊d·k⌋ + 1 entries, so our k is set to keep as many."""
    utils = pytest.importorskip("fusion_bench.method.ties_merging.ties_merging_utils")
    from mtl.merging.task_vectors import stack

    g = torch.Generator().manual_seed(0)
    tv = [{"a": torch.randn(30, 20, generator=g), "b": torch.randn(400, generator=g)}]
    tv = tv + [{k: torch.randn(v.shape, generator=g) for k, v in tv[0].items()} for _ in range(3)]
    base = {k: torch.zeros_like(v) for k, v in tv[0].items()}
    expected = utils.ties_merging(stack(tv), reset_thresh=20, merge_func=f"dis-{aggregate}")
    merged = Ties(k=201 / 1000, scaling=1.0, aggregate=aggregate)(base, tv)
    torch.testing.assert_close(stack([merged])[0], expected)


def test_concrete_mask_learns_which_entries_to_keep():
    from mtl.merging.concrete import ConcreteTaskArithmetic

    # depth = λ (m₀ x₀ + m₁ x₁)·1 with λ = 1 against 2·x₀: the mask m / mean(m) = (2, 0) fits
    toy = _Toy(["depth"], 1, inputs=2)
    base = {"backbone.weight": torch.zeros(1, 2, 1, 1)}
    tv = [{"backbone.weight": torch.ones(1, 2, 1, 1)}]
    method = ConcreteTaskArithmetic(scaling=1.0, objective="supervised", steps=200, lr=0.05)
    close(method(base, tv), tv[0])  # without data: Task Arithmetic (mask 1)
    merged = method.learn(base, tv, toy, _batches(2.0, inputs=2), torch.device("cpu"))
    first, second = merged["backbone.weight"].flatten().tolist()
    assert first > 1.5 and second < 0.5


def test_concrete_adamerging_learns_coefficients_and_one_shared_mask():
    from mtl.merging.concrete import ConcreteAdaMerging

    # depth = (λ₁ + λ₂/2)(m₀ x₀ + m₁ x₁) against 2·x₀, λ from 0 clamped to [0, 1]: the optimum
    # is the mask m / mean(m) = (2, 0) with λ₁ + λ₂/2 = 1, so both λ rise and the mask keeps x₀
    toy = _Toy(["depth"], 1, inputs=2)
    base = {"backbone.weight": torch.zeros(1, 2, 1, 1)}
    tv = [{"backbone.weight": torch.ones(1, 2, 1, 1)},
          {"backbone.weight": torch.full((1, 2, 1, 1), 0.5)}]  # fmt: skip
    method = ConcreteAdaMerging(
        granularity="task", init=0.0, objective="supervised", steps=150, adamerging_steps=50,
        lr=0.05,
    )  # fmt: skip
    merged = method.learn(base, tv, toy, _batches(2.0, inputs=2), torch.device("cpu"))
    lam = method.coefficients.flatten()
    assert method.coefficients.shape == (2, 1) and float(lam.min()) > 0.3
    mask = method.mask["backbone.weight"]
    assert mask.shape == base["backbone.weight"].shape  # one mask, no task dimension
    m0, m1 = mask.flatten().tolist()
    assert m0 > 1.5 and m1 < 0.5
    close(merged, {"backbone.weight": mask * (lam[0] * tv[0]["backbone.weight"]
                                              + lam[1] * tv[1]["backbone.weight"])})  # fmt: skip
    first, second = merged["backbone.weight"].flatten().tolist()
    assert first == pytest.approx(2.0, abs=0.2) and abs(second) < 0.2


def test_concrete_adamerging_with_an_all_ones_mask_is_adamerging():
    from mtl.merging.adamerging import LearnedCoefficients
    from mtl.merging.concrete import ConcreteAdaMerging

    toy = _Toy(["depth"], 1, inputs=2)
    base = {"backbone.weight": torch.zeros(1, 2, 1, 1)}
    tv = [{"backbone.weight": T([1.0, 0.5]).reshape(1, 2, 1, 1)},
          {"backbone.weight": T([0.2, 1.0]).reshape(1, 2, 1, 1)}]  # fmt: skip
    keys = dict(granularity="tensor", init=0.3, objective="supervised", lr=0.05)
    batch = next(_batches(2.0, inputs=2))  # one batch for both, drawn once
    concrete = ConcreteAdaMerging(**keys, steps=20, adamerging_steps=10, mask_init=1e4)
    merged = concrete.learn(base, tv, toy, itertools.repeat(batch), torch.device("cpu"))
    ada = LearnedCoefficients(**keys, steps=30)
    expected = ada.learn(base, tv, toy, itertools.repeat(batch), torch.device("cpu"))
    assert torch.equal(concrete.mask["backbone.weight"], torch.ones(1, 2, 1, 1))
    torch.testing.assert_close(concrete.coefficients, ada.coefficients)
    assert not torch.equal(ada.coefficients, torch.full((2, 1), 0.3))  # it did learn
    close(merged, expected)


def _lora_run() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny encoder (LayerNorm, LoRA-wrapped Linear) 'fine-tuned' from θ₀: B and the norm
    moved, the base weight frozen; returns the model and θ₀ (the plain model's names)."""
    from torch import nn

    from mtl.models.adapters import LoRALinear

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4))
    theta0 = {f"backbone.{k}": v.clone() for k, v in encoder.state_dict().items()}
    encoder[1] = LoRALinear(encoder[1], rank=2, alpha=4.0)
    with torch.no_grad():
        encoder[1].lora_B.normal_()
        encoder[0].weight.add_(0.1)
    return nn.ModuleDict({"backbone": encoder}), theta0


def test_task_arithmetic_of_one_lora_task_at_one_is_its_merged_model():
    """A LoRA run is merged through its dense delta (α/r)·B·A: TA at λ = 1 of that one task
    gives the LoRA model with its pair folded in (same weights, same outputs)."""
    from torch import nn

    from mtl.merging.lora import fold_lora, lora_scale

    model, theta0 = _lora_run()
    x = torch.randn(3, 6)
    expected_out = model["backbone"](x)
    tuned = fold_lora(model.state_dict(), lora_scale({"alpha": 4.0, "rank": 2}))
    assert tuned.keys() == theta0.keys()
    merged = add(theta0, TaskArithmetic(scaling=1.0)(theta0, [task_vector(tuned, theta0)]))
    model["backbone"][1].merge()  # the adapter's own fold: base.weight += (α/r)·B·A
    lora = model.state_dict()
    torch.testing.assert_close(merged["backbone.1.weight"], lora["backbone.1.base.weight"])
    torch.testing.assert_close(merged["backbone.0.weight"], lora["backbone.0.weight"])
    delta = merged["backbone.1.weight"] - theta0["backbone.1.weight"]
    assert torch.linalg.matrix_rank(delta) == 2  # the dense delta of a rank-2 pair
    plain = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4))
    plain.load_state_dict({k[len("backbone.") :]: v for k, v in merged.items()})
    torch.testing.assert_close(plain(x), expected_out)


def test_lora_checkpoints_are_read_dense_task_aware_adapters_refused(tmp_path):
    from mtl.merging.checkpoints import read_single_task

    model, _ = _lora_run()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    lora = {"_target_": "mtl.models.adapters.LoRA", "rank": 2, "alpha": 4.0}
    mtlora = {"_target_": "mtl.models.adapters.MTLoRA", "rank": 2}
    for name, adapter in (("lora", lora), ("mtlora", mtlora)):
        config = {"data": {"tasks": ["depth"]}, "model": {"adapter": adapter}}
        torch.save({"state_dict": state, "mtl_config": config}, tmp_path / f"{name}.ckpt")
    run = read_single_task(tmp_path / "lora.ckpt")
    assert run.folded_lora and run.config.model.adapter._target_.endswith("NoAdapter")
    assert sorted(run.state) == ["backbone.0.bias", "backbone.0.weight", "backbone.1.bias",
                                 "backbone.1.weight"]  # fmt: skip
    with pytest.raises(MergeError, match=r"model/adapter=mtlora; merging takes fully"):
        read_single_task(tmp_path / "mtlora.ckpt")
