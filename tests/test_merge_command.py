"""``python -m mtl.merge`` on two tiny single-task checkpoints: what it writes, that the merged
checkpoint evaluates like any other, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtl.config import ConfigError
from mtl.merge import method_overrides, run
from mtl.merging.run import merge
from mtl.merging.task_vectors import MergeError
from tests.conftest import CONF, ROOT, TINY_DATA

SHORT = [
    "model/decoder=conv",
    "model.decoder.hidden_channels=8",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "trainer.num_sanity_val_steps=0",
    "diagnostics_every_n_steps=0",
]


def _train_cfg(root: Path, out: Path, *overrides: str):
    base = [
        *TINY_DATA,
        f"data.root={root}",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=[*base, *SHORT, *overrides])


@pytest.fixture(scope="module")
def single(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One semseg and one depth checkpoint, trained from the same seeded initialisation."""
    from mtl.train import train

    out = tmp_path_factory.mktemp("single")
    paths = {}
    for task in ("semseg", "depth"):
        train(_train_cfg(tiny_data_root, out / task, f"data.tasks=[{task}]"))
        paths[task] = out / task / "checkpoints" / "last.ckpt"
    return paths


def _merge(out: Path, *overrides: str) -> dict[str, float]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            config_name="merge",
            overrides=[
                f"paths.output_dir={out}",
                "accelerator=cpu",
                *method_overrides(list(overrides)),
            ],
        )
    return merge(cfg)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_task_arithmetic_of_one_task_at_one_is_that_model(single, tmp_path):
    """TA with λ = 1 on one checkpoint (statistics averaged over one) is the checkpoint: same
    weights, same scores, Δm 0."""
    scores = _merge(tmp_path, "method=task_arithmetic", "method.scaling=1.0", "recompute_bn=false",
                    f"checkpoints=[{single['semseg']}]")  # fmt: skip
    merged, own = _state(tmp_path / "merged.ckpt"), _state(single["semseg"])
    for key, value in own.items():
        if key.startswith("model."):
            torch.testing.assert_close(merged[key].float(), value.float(), msg=key)
    assert scores["test/semseg/mIoU"] == pytest.approx(scores["single/semseg/mIoU"])
    assert scores["test/delta_m"] == pytest.approx(0.0, abs=1e-6)


def test_ties_merge_realigns_and_evaluates_like_any_checkpoint(single, tmp_path):
    from mtl.api import load
    from mtl.train import train

    scores = _merge(tmp_path / "m", "method=ties", "realign.steps=2",
                    f"checkpoints=[{single['semseg']},{single['depth']}]")  # fmt: skip
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert written == pytest.approx(scores)
    for key in ("test/delta_m", "unaligned/delta_m", "single/depth/rmse", "test/semseg/mIoU"):
        assert key in scores, key

    merged = _state(tmp_path / "m" / "merged.ckpt")
    depth, semseg = _state(single["depth"]), _state(single["semseg"])
    # the encoder is neither input; re-alignment changed the heads, never the encoder
    conv = "model.backbone.model.layer4.1.conv2.weight"
    assert not torch.equal(merged[conv], semseg[conv]) and not torch.equal(
        merged[conv], depth[conv]
    )
    head = next(k for k in depth if k.startswith("model.decoders.depth.") and k.endswith("weight"))
    assert not torch.equal(merged[head], depth[head])
    assert load(tmp_path / "m" / "merged.ckpt").tasks == ["semseg", "depth"]

    # eval.py's path: the merged checkpoint's stored config builds model and data
    cfg = _train_cfg(Path("unused"), tmp_path / "eval", "train=false",
                     f"ckpt_path={tmp_path / 'm' / 'merged.ckpt'}")  # fmt: skip
    evaluated = train(cfg)
    for key in ("test/semseg/mIoU", "test/depth/rmse"):
        assert evaluated[key] == pytest.approx(scores[key], rel=1e-5), key


def test_merging_refuses_another_architecture_or_a_repeated_task(single, tmp_path):
    checkpoint = torch.load(single["depth"], map_location="cpu", weights_only=True)
    key = "model.backbone.model.layer1.0.conv1.weight"
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:, :-1]
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(
        MergeError, match=r"another architecture.*layer1\.0\.conv1\.weight has shape"
    ):
        _merge(tmp_path, f"checkpoints=[{single['semseg']},{other}]")
    with pytest.raises(MergeError, match="both semseg models"):
        _merge(tmp_path, f"checkpoints=[{single['semseg']},{single['semseg']}]")


def test_init_from_copies_the_encoder_and_refuses_another_one(single, tiny_data_root, tmp_path):
    from mtl.train import build_model

    source = _state(single["semseg"])
    model = build_model(_train_cfg(tiny_data_root, tmp_path, "data.tasks=[semseg,depth]",
                                   f"model.init_from={single['semseg']}"))  # fmt: skip
    state = model.state_dict()
    for key in ("backbone.model.conv1.weight", "decoders.semseg.head.weight"):
        if f"model.{key}" in source:
            assert torch.equal(state[key], source[f"model.{key}"]), key
    wrong = _train_cfg(tiny_data_root, tmp_path, "model/backbone=vit_tiny",
                       f"model.init_from={single['semseg']}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.init_from: .* does not fit .* is missing"):
        build_model(wrong)


def test_a_bad_checkpoint_path_is_one_error_line(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="merge", overrides=[f"paths.output_dir={tmp_path}",
                      "merge@method=ties", "checkpoints=[nowhere.ckpt]"])  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        run(cfg)
    assert stop.value.code == "error: checkpoints: no checkpoint file at nowhere.ckpt"


def test_learned_coefficients_are_fitted_and_scored_on_the_held_out_split(
    single, tiny_data_root, tmp_path, monkeypatch
):
    """Checkpoints trained with data.val_fraction: AdaMerging reads only the held-out
    training samples, and metrics.json scores them (selection/...) and says so."""
    from mtl.merging.adamerging import LearnedCoefficients
    from mtl.train import build_datamodule

    held_cfg = _train_cfg(tiny_data_root, tmp_path / "d", "data.val_fraction=0.25")
    dm = build_datamodule(held_cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    holdout = dm.datasets["holdout"]
    held = {holdout.dataset.ids[i] for i in holdout.indices}
    paths = []
    for task in ("semseg", "depth"):  # as trained with data.val_fraction=0.25
        checkpoint = torch.load(single[task], map_location="cpu", weights_only=True)
        checkpoint["mtl_config"]["data"]["val_fraction"] = 0.25
        paths.append(tmp_path / f"{task}.ckpt")
        torch.save(checkpoint, paths[-1])
    seen: list[str] = []
    objective = LearnedCoefficients.objective_loss

    def spy(self, module, params, batch, device):
        seen.extend(batch["meta"]["id"])
        return objective(self, module, params, batch, device)

    monkeypatch.setattr(LearnedCoefficients, "objective_loss", spy)
    scores = _merge(tmp_path / "m", "method=adamerging", "method.steps=3", "recompute_bn=false",
                    f"checkpoints=[{paths[0]},{paths[1]}]")  # fmt: skip
    assert seen and set(seen) <= held
    assert scores["merge/chosen_on"].startswith("holdout: 0.25 of the training split")
    for key in ("selection/semseg/mIoU", "selection/depth/rmse", "selection/delta_m"):
        assert key in scores, key
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["merge/chosen_on"] == (
        scores["merge/chosen_on"]
    )
