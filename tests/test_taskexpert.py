"""The TaskExpert decoder (a reconstruction) on tiny random-init backbones, and its experiments."""

from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtl.config import ConfigError, validate_config
from mtl.models.backbone import Backbone
from mtl.models.decoders import TaskExpertDecoder
from mtl.models.multitask import MultiTaskModel

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = {"semseg": 5, "depth": 1, "normals": 3}
TINY_VIT = dict(img_size=(32, 48), patch_size=8, out_indices=(1, 3, 5, 7))


def _decoder(**options) -> TaskExpertDecoder:
    torch.manual_seed(0)
    options = dict(hidden_channels=8, num_experts=3) | options
    return TaskExpertDecoder([6, 6, 6], [16, 16, 16], TASKS, **options).eval()


def _features(batch: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, 6, 4, 5) for _ in range(3)]


@pytest.mark.parametrize(
    "name, kwargs, size, stride",
    [
        ("vit_tiny_patch16_224", TINY_VIT, (32, 48), 8),
        ("resnet18", dict(out_indices=(1, 2, 3)), (64, 96), 4),  # levels resized to the finest
    ],
)
def test_predictions_at_a_quarter_of_the_finest_stride_and_at_input_size(
    name, kwargs, size, stride
):
    backbone = Backbone(name, **kwargs)
    factory = partial(TaskExpertDecoder, hidden_channels=16, num_experts=4)
    model = MultiTaskModel(backbone, factory, TASKS).eval()
    images = torch.randn(2, 3, *size)
    raw = model.decoders(dict.fromkeys(TASKS, backbone(images)))
    h, w = size[0] // stride * 4, size[1] // stride * 4
    assert {t: tuple(p.shape) for t, p in raw.items()} == {
        t: (2, c, h, w) for t, c in TASKS.items()
    }
    preds = model(images)
    assert {t: tuple(p.shape) for t, p in preds.items()} == {
        t: (2, c, *size) for t, c in TASKS.items()
    }
    assert len(model.decoders.last_gates["depth"]) == len(backbone.out_channels)


@pytest.mark.parametrize("gate", ["pixel", "image"])
def test_gates_sum_to_one_per_pixel_or_per_image(gate):
    decoder = _decoder(gate=gate)
    decoder(dict.fromkeys(TASKS, _features()))
    for task in TASKS:
        for gates in decoder.last_gates[task]:
            assert gates.shape == ((2, 4, 4, 5) if gate == "pixel" else (2, 4, 1, 1))
            assert (gates >= 0).all()
            torch.testing.assert_close(gates.sum(dim=1), torch.ones_like(gates[:, 0]))
    if gate == "pixel":  # dynamic: positions of one image are routed differently
        gates = decoder.last_gates["semseg"][1]
        assert not torch.allclose(gates[0, :, 0, 0], gates[0, :, 3, 4])
    gates = decoder.last_gates["semseg"][1]
    assert not torch.allclose(gates[0], gates[1])  # and images too


@pytest.mark.parametrize("update", ["replace", "accumulate"])
def test_each_level_reads_the_previous_memory_as_an_extra_expert_and_writes_its_own(update):
    decoder = _decoder(memory_update=update, memory_init="expert")
    features = _features()
    memories = decoder.memories(dict.fromkeys(TASKS, features))["depth"]
    assert len(memories) == 4  # M^0 (from the first level) and one per level
    level = decoder.levels[2]
    x = decoder.project(2, features)
    experts = level.experts(x)

    def write(previous: torch.Tensor) -> torch.Tensor:
        gates = level.gate("depth", x, previous)
        read = sum(gates[:, k : k + 1] * experts[:, k] for k in range(3))  # by hand
        read = read + gates[:, 3:] * previous
        return previous + read if update == "accumulate" else read

    torch.testing.assert_close(memories[3], write(memories[2]))
    nudged = write(memories[2] + 0.5 * torch.randn_like(memories[2]))
    assert (nudged - memories[3]).abs().max() > 1e-3  # M^2 is read by level 3


def test_a_tasks_initial_memory_reaches_its_prediction_alone():
    decoder = _decoder()
    inputs = dict.fromkeys(TASKS, _features())
    before = decoder(inputs)
    with torch.no_grad():
        decoder.memory_init["depth"].bias.add_(1.0)
    after = decoder(inputs)
    assert (after["depth"] - before["depth"]).abs().max() > 1e-4
    torch.testing.assert_close(after["semseg"], before["semseg"])


def test_balance_loss_is_off_by_default_and_split_among_tasks_with_its_weight():
    inputs = dict.fromkeys(TASKS, _features())
    decoder = _decoder()
    decoder(inputs)
    assert decoder.auxiliary_losses() == {}
    decoder = _decoder(balance_weight=0.01)
    decoder(inputs)
    aux = decoder.auxiliary_losses()
    assert set(aux) == set(TASKS)
    total = 0.0
    for level in range(3):  # cv² of each expert's mean probability over tasks, images, pixels
        usage = torch.stack([decoder.last_gates[t][level][:, :3] for t in TASKS])
        usage = usage.mean(dim=(0, 1, 3, 4))
        total += usage.var() / usage.mean() ** 2
    for task in TASKS:
        torch.testing.assert_close(aux[task], 0.01 * total / 3)
    assert aux["depth"] > 0 and aux["depth"].requires_grad
    model_aux = MultiTaskModel(
        Backbone("vit_tiny_patch16_224", **TINY_VIT),
        partial(TaskExpertDecoder, hidden_channels=8, num_experts=3, balance_weight=0.01),
        TASKS,
    )
    model_aux(torch.randn(2, 3, 32, 48), ["depth", "normals"])
    assert set(model_aux.auxiliary_losses()) == {"depth", "normals"}


def test_single_task_forward_runs_its_parts_only_and_equals_the_all_task_forward():
    decoder = _decoder(memory_init="expert")
    features = _features()
    every = decoder(dict.fromkeys(TASKS, features))
    calls = []
    for task in TASKS:
        decoder.heads[task].register_forward_hook(lambda m, i, o, t=task: calls.append(t))
        decoder.levels[0].gates[task].register_forward_hook(lambda m, i, o, t=task: calls.append(t))
    one = decoder({"normals": features})
    assert list(one) == ["normals"] and set(calls) == {"normals"}
    torch.testing.assert_close(one["normals"], every["normals"])

    decoder.train()
    decoder({"normals": features})["normals"].sum().backward()
    for task in TASKS:
        touched = [p.grad is not None for p in decoder.task_parameters(task)]
        assert all(touched) if task == "normals" else not any(touched), task
    shared = {id(p) for p in decoder.shared_parameters()}
    own = [{id(p) for p in decoder.task_parameters(t)} for t in TASKS]
    assert shared == {id(p) for level in decoder.levels for p in level.project.parameters()} | {
        id(p) for level in decoder.levels for p in level.experts.parameters()
    }
    assert not shared & set().union(*own)


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=list(overrides))


def test_bad_decoder_options_are_reported_before_building():
    cfg = _compose("model/decoder=taskexpert", "model.decoder.gate=pixels",
                   "model.decoder.num_experts=0")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert "model.decoder.gate: 'pixels'; expected one of ['pixel', 'image']" in str(error.value)
    assert "model.decoder.num_experts: 0; expected an integer >= 1" in str(error.value)
    with pytest.raises(ConfigError, match=r"model.decoder.rates: \[12, 0\]; expected a list"):
        validate_config(_compose("model/decoder=aspp", "model.decoder.rates=[12,0]"))


@pytest.mark.parametrize(
    "dataset, lr, width, size",
    [("nyud", 1e-5, 768, [448, 576]), ("pascal", 2e-5, 452, [512, 512])],
)
def test_vit_large_experiments_compose_with_the_recipe_and_validate(dataset, lr, width, size):
    cfg = _compose(f"experiment={dataset}_vit_large_taskexpert")
    assert cfg.model.backbone.name == "vit_large_patch16_384.augreg_in21k_ft_in1k"
    assert list(cfg.model.backbone.out_indices) == [5, 11, 17, 23]  # blocks 6/12/18, final
    assert cfg.model.backbone.norm_last is True and cfg.model.backbone.drop_path_rate == 0.15
    assert cfg.model.decoder._target_.endswith("TaskExpertDecoder")
    assert cfg.model.decoder.hidden_channels == width and cfg.model.decoder.num_experts == 9
    optim = cfg.optim
    assert optim.optimizer._target_ == "torch.optim.Adam" and optim.optimizer.lr == lr
    assert optim.optimizer.weight_decay == 1e-6 and optim.grad_clip_norm == 10
    assert optim.scheduler.power == 0.9 and optim.scheduler.warmup_steps == 0
    assert cfg.trainer.max_steps == 40000 and cfg.data.batch_size == 2
    assert list(cfg.data.image_size) == size and cfg.data.protocol == "pad"
    assert cfg.data.loss_weights.edge == 50 and cfg.data.loss_weights.normals == 10
    assert cfg.data.loss_options.edge.pos_weight == 0.95
    validate_config(_compose(f"experiment={dataset}_vit_large_taskexpert",
                             "model.backbone.pretrained=false"))  # fmt: skip
