"""The datamodule with the real-dataset configs: loaders, worker set-up, and every NYUD-v2 and
PASCAL-Context experiment run for one batch on tiny folders written in the exact formats."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

from mtl.data.datamodule import MultiTaskDataModule
from mtl.data.formats import write_nyud, write_pascal
from mtl.data.nyud import NYUDDataset
from mtl.data.transforms import ToTensorNormalize, eval_transforms, train_transforms
from mtl.train import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
REAL_DATA = {"nyud": "nyud", "pascal": "pascal_context"}
SPLITS = {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny datasets smaller than the test image size, so evaluation pads."""
    base = tmp_path_factory.mktemp("real")
    write_nyud(base / "NYUD_MT", SPLITS, "atrc", size=(30, 44))
    write_pascal(base / "PASCAL_MT", SPLITS, size=(30, 44), persons=["t1", "v0"])
    return {"nyud": base / "NYUD_MT", "pascal_context": base / "PASCAL_MT"}


@pytest.fixture(scope="module")
def vit_tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm ViT-Tiny state dict as a user would save it (the experiments need weights)."""
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), path)
    return path


def _real_data_experiments() -> list[str]:
    return [e for e in EXPERIMENTS if e.split("_")[0] in REAL_DATA]


@pytest.mark.parametrize("experiment", _real_data_experiments())
def test_real_data_experiment_runs_one_batch(
    experiment: str, folders, vit_tiny_weights: Path, tmp_path: Path
) -> None:
    dataset = REAL_DATA[experiment.split("_")[0]]
    overrides = [
        f"experiment={experiment}",
        "debug=fdr",
        f"data.root={folders[dataset]}",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={tmp_path / 'run'}",
        "data.image_size=[32,48]",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model.backbone.name=vit_tiny_patch16_224",
        "+model.backbone.patch_size=8",
        f"model.backbone.pretrained_file={vit_tiny_weights}",
        "trainer.enable_progress_bar=false",
    ]
    if dataset == "pascal_context":
        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")  # not under the repository
    if "mlore" in experiment:  # a narrow decoder with few experts; ViT-Tiny's 12 blocks
        overrides += ["model.backbone.out_indices=[2,5,8,11]", "model.decoder.embed_dim=16",
                      "model.decoder.rank_list=[2,3,4]", "model.decoder.spe_rank=2",
                      "model.decoder.topk=2"]  # fmt: skip
    if "taskexpert" in experiment:  # a narrow decoder; ViT-Tiny's 12 blocks
        overrides += ["model.backbone.out_indices=[2,5,8,11]", "model.decoder.hidden_channels=16"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.data.name == dataset
    scores = train(cfg)
    for task in cfg.data.tasks:
        assert f"val/{task}/loss" in scores, task
    assert "val/semseg/mIoU" in scores
    if dataset == "pascal_context":
        assert "val/parts/mIoU" in scores


def test_data_configs_have_the_published_loss_weights_and_protocols() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        nyud = compose(config_name="train", overrides=["data=nyud"]).data
        pascal = compose(config_name="train", overrides=["data=pascal_context"]).data
        synthetic = compose(config_name="train").data
    assert dict(nyud.loss_weights) == {"semseg": 1, "depth": 1, "normals": 10, "edge": 50}
    assert dict(pascal.loss_weights) == {"semseg": 1, "parts": 2, "sal": 5, "normals": 10,
                                         "edge": 50}  # fmt: skip
    assert list(nyud.image_size) == [448, 576] and list(pascal.image_size) == [512, 512]
    assert list(nyud.scale_range) == [0.5, 2.0] and nyud.cat_max_ratio == 0.75
    assert len(nyud.class_names.semseg) == 40 and len(pascal.class_names.semseg) == 21
    required = set(synthetic) - {"generate", "prepare"}
    assert required <= set(nyud) and required <= set(pascal)


def test_loader_workers_use_one_opencv_thread(folders) -> None:
    class Record(ToTensorNormalize):
        def __call__(self, sample):
            out = super().__call__(sample)
            out["meta"] = {**out["meta"], "cv2_threads": cv2.getNumThreads()}
            return out

    datamodule = MultiTaskDataModule(
        dataset=partial(NYUDDataset, root=folders["nyud"]),
        tasks=["semseg", "depth"],
        batch_size=2,
        train_transform=train_transforms((32, 48)),
        val_transform=Record(),
        num_workers=1,
    )
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["meta"]["cv2_threads"].tolist() == [1, 1]
    assert batch["image"].shape == (2, 3, 30, 44)


def test_eval_batches_pad_and_record_the_padding(folders) -> None:
    datamodule = MultiTaskDataModule(
        dataset=partial(NYUDDataset, root=folders["nyud"]),
        tasks=["semseg", "depth", "normals", "edge"],
        batch_size=2,
        val_transform=eval_transforms((32, 48)),
    )
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 48)
    assert [int(v[0]) for v in batch["meta"]["pad"]] == [0, 2, 0, 4]
    assert (batch["semseg"][:, 30:] == 255).all() and (batch["depth"][..., 44:] == 0).all()



def _carved_ids(make_cfg, *overrides: str) -> tuple[list[str], list[str], list[str]]:
    """The ids the training loader serves (one epoch), those of the held-out loader, and all
    of the training split."""
    from mtl.train import build_datamodule

    dm = build_datamodule(make_cfg("data.tasks=[semseg]", "data.batch_size=1", *overrides).data)
    dm.prepare_data()
    dm.setup("fit")
    train = [i for batch in dm.train_dataloader() for i in batch["meta"]["id"]]
    held = [i for batch in dm.holdout_dataloader() for i in batch["meta"]["id"]]
    return train, held, list(dm.dataset_factory(split="train", tasks=["semseg"]).ids)


def test_val_fraction_holds_out_training_samples_by_seed(make_cfg):
    """data.val_fraction carves a seeded part of the training split: training never sees it,
    the same seed carves the same samples, another seed others."""
    train, held, every = _carved_ids(make_cfg, "data.val_fraction=0.25")
    assert len(held) == 4 and len(train) == 12 and not set(train) & set(held)
    assert sorted(train + held) == sorted(every)
    assert _carved_ids(make_cfg, "data.val_fraction=0.25")[1] == held
    assert _carved_ids(make_cfg, "data.val_fraction=0.25", "data.val_seed=1")[1] != held
