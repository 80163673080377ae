"""The benchmark suite's tables, with tiny settings: rows, columns and sane values."""

from __future__ import annotations

import math
import time

import pytest
import torch

from bench import adapters, balancers, decoders, gpu, overhead
from bench.models import count_flops
from bench.table import Table
from bench.timing import (
    median_interval,
    median_paired_ratio,
    median_seconds,
    peak_rss_growth_mib,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: timings of a shared machine stay short and stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flops_are_exact_for_linear_and_conv():
    linear, x = torch.nn.Linear(8, 4), torch.randn(3, 8)
    assert count_flops(lambda: linear(x)) == 2 * 3 * 8 * 4
    conv, image = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1), torch.randn(1, 2, 5, 5)
    assert count_flops(lambda: conv(image)) == 2 * (3 * 5 * 5) * (2 * 3 * 3)


def test_timing_helpers():
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5
    assert median_interval([0.0, 5.0, 6.0, 8.0, 9.0], skip=1) == 1.0
    order = []
    ratio = median_paired_ratio(
        lambda: (order.append("f"), time.sleep(0.03)),
        lambda: (order.append("r"), time.sleep(0.01)),
        repeats=3,
    )
    assert order == ["r", "f"] * 4  # one warm-up pair, then three timed pairs
    assert 2.0 < ratio < 4.5


def test_peak_memory_sees_a_large_allocation():
    growth = peak_rss_growth_mib(lambda: torch.ones(16 * 2**20))  # 64 MiB, always mmapped
    assert math.isnan(growth) or 56 <= growth <= 100


def test_table_markdown():
    table = Table("t", ["a", "b"], [["x", 1.5], ["y", 1234]], ["note"])
    text = table.markdown()
    assert "| a | b |" in text and "| x | 1.50 |" in text and "| y | 1,234 |" in text
    assert table.column("b") == [1.5, 1234]


def test_adapter_tables():
    settings = adapters.Settings(arch="vit_tiny_4", size=(32, 32), batch_size=1, repeats=1)
    table = adapters.cost_table(settings)
    assert table.column("adapter") == [
        *["none", "lora", "mtlora", "moe", "modsquad", "mhr", "polyhistor", "polyhistor_lite"]
    ]
    for one, every in zip(
        table.column("GFLOPs semseg only"), table.column("GFLOPs all tasks"), strict=True
    ):
        assert 0 < one < every
    assert all(r > 0 for r in table.column("step time / none"))
    settings.experts, settings.top_k = (2,), (1, 2)
    moe = adapters.moe_table(settings)
    assert moe.column("E") == [2]
    for row in moe.rows:
        assert 0 < row[1] < row[2]  # top-2 costs more than top-1
    extraction = adapters.extraction_table(settings)
    assert extraction.column("experts kept") == ["all", "top-k", "half"] * 2
    ratios = extraction.column("params / full")
    assert ratios[1] < ratios[2] < 1 and ratios[4] < ratios[5] < 1  # fewer experts, fewer params


def test_balancer_tables():
    settings = balancers.Settings(batch_size=2, size=(32, 32), repeats=1)
    table = balancers.method_table(settings, methods=["pcgrad (rep)"])
    assert table.column("method") == ["equal", "pcgrad (rep)"]
    assert all(r > 0 for r in table.column("step time / equal"))
    growth = balancers.growth_table(settings, counts=(6,))  # one registered copy of depth
    assert growth.column("T") == [6]
    assert all(r > 0 for r in growth.column("pcgrad (param)"))


def test_overhead_table():
    settings = overhead.Settings(steps=1, warmup=1, rounds=1, batch_size=2, size=(32, 32))
    table = overhead.overhead_table(settings)
    assert len(table.rows) == 5
    assert table.rows[0][2] == 1.0
    assert all(r > 0 for r in table.column("ratio to plain"))


def test_edge_table_scores_like_the_reference_and_faster():
    """Seconds: two tiny sizes, one image each, 9 thresholds; the same scores as the seeded
    whole-image reference (its random outlier edges lose nothing on graphs this small)."""
    from bench import edge
    from mtl.metrics.boundary import pyedgeeval_available

    if not pyedgeeval_available():
        pytest.skip("pyedgeeval not installed (pip install -e '.[edge]')")
    table = edge.edge_table(edge.Settings.tiny())
    assert table.column("size") == ["48x64", "60x80"]
    for name in ("odsF ref / mtl", "oisF ref / mtl", "AP ref / mtl"):
        for cell in table.column(name):
            reference, ours = cell.split(" / ")
            assert reference == ours and 0 < float(ours) <= 1
    assert all(cell.startswith("0 of ") for cell in table.column("matched px lost by ref"))
    assert all(r > 1 for r in table.column("speed-up"))


def test_data_pipeline_table_gives_the_decode_only_rate():
    """Two samples of NYUD-v2 (ATRC layout) and PASCAL_MT, one pass: both pipelines and the
    decode-only rate (what a worker does with data.gpu_augment) measured for each."""
    from bench import data

    table = data.pipeline_table(data.Settings(samples=2, repeats=1, nyud_variants=("atrc",)))
    assert len(table.rows) == 2 and "gpu_augment" in table.notes[0]
    assert table.column("data")[0].startswith("NYUD-v2 ATRC")
    for row in table.rows:
        assert all(math.isfinite(r) and r > 0 for r in row[1:])


def test_gpu_peaks_and_skip_without_cuda():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops("Some GPU") is None
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the skip note does not apply")
    table = gpu.gpu_table(gpu.Settings())
    assert table.rows == [] and "Skipped" in table.notes[0]


@pytest.mark.slow
def test_balancer_comparison_trains_baselines_and_methods_into_one_table(tmp_path, capsys):
    from bench import balancer_comparison

    balancer_comparison.main(["--quick", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    baselines = (tmp_path / "baselines.yaml").read_text()
    assert all(f"\n{task}:\n" in f"\n{baselines}" for task in balancer_comparison.TASKS)
    rows = [line for line in table.splitlines() if line.startswith("| balancer=")]
    assert [row.split(" |")[0] for row in rows] == ["| balancer=equal", "| balancer=pcgrad"]
    assert "Δm (%)" in table and all(row.rstrip(" |").split("| ")[-1][0] in "+-" for row in rows)


def test_the_balancer_benchmark_covers_every_config_and_each_steps():
    """Every ``conf/balancer/`` config is a row of the benchmark (both modes where it offers
    them), and one tiny training step of each runs."""
    from pathlib import Path

    configs = {p.stem for p in (Path(balancers.CONF) / "balancer").glob("*.yaml")} - {"equal"}
    rows = balancers.configurations(len(balancers.ALL_TASKS))
    assert {name.split(" ")[0] for name, _, _ in rows} >= configs
    settings = balancers.Settings(batch_size=6, size=(32, 32), repeats=1)  # MoDo: 3 x 2
    for _, overrides, _ in rows:
        step = balancers.make_step(overrides, balancers.ALL_TASKS, settings)
        step()  # raises for a configuration the benchmark cannot run


def test_merging_benchmark_tiny_mode_prints_every_row(tmp_path, capsys):
    from bench import merging

    merging.main(["--tiny", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    rows = ["single-task models", "joint multi-task training", "initial encoder", "| ties |",
            "ties + re-aligned heads (2 steps)", "| ties | "]  # fmt: skip
    for row in rows:
        assert row in printed, row
    assert (tmp_path / "merged" / "ties" / "merged.ckpt").is_file()
    single = [line for line in printed.splitlines() if line.startswith("| single-task models")]
    assert single[0].endswith("| +0.00 |")


def test_controllability_is_the_mean_rank_correlation_of_preference_and_kept_score():
    from bench.controllable import controllability

    follows = {"semseg": 0.9, "depth": 0.8, "normals": 0.7}
    inverted = {"semseg": 0.7, "depth": 0.8, "normals": 0.9}
    preference = {"semseg": 0.6, "depth": 0.3, "normals": 0.1}
    rows = [(0.5, preference, follows), (0.7, preference, inverted), (1.0, preference, inverted)]
    assert controllability(rows[:1]) == (1.0, 1)
    assert controllability(rows) == (0.0, 2)  # budget 1 is left out


def test_controllable_tiny(tmp_path):
    from bench import controllable

    tables = controllable.run(controllable.Settings.tiny(), tmp_path)
    grid = tables[0]
    assert len(grid.rows) == 4 and (tmp_path / "controllable.png").stat().st_size > 0
    flops = grid.column("GFLOPs")
    assert flops[0] < flops[-1] and grid.column("budget") == [0.6, 0.6, 1.0, 1.0]
    first, second = ([float(w) for w in c.split("/")] for c in grid.column(grid.header[2])[:2])
    assert first[1] >= first[2] >= first[3] and second[2] >= second[3] >= second[1]
    assert first[1] > second[1]  # semseg preferred first, least preferred second
    assert "Controllability" in grid.notes[-1]


def test_decoder_table_covers_every_decoder_config():
    table = decoders.cost_table(decoders.Settings.small())
    names = decoders.decoder_names()
    assert {"conv", "hrnet", "mlore"} <= set(names)
    assert table.column("decoder") == names
    for one, every in zip(
        table.column("GFLOPs semseg only"), table.column("GFLOPs all tasks"), strict=True
    ):
        assert 0 < one < every
    assert all(p > 0 for p in table.column("decoder params"))
    assert f"{decoders.MLORE_PASCAL_VIT_LARGE:,} parameters implied" in table.notes[-1]


def test_mlore_parameter_count_by_hand_matches_the_module():
    from mtl.models.decoders import MLoRE

    small = dict(in_channels=[24, 32, 32, 40], task_channels={"semseg": 5, "depth": 1},
                 tokens=12, embed_dim=20, rank_list=[2, 3, 5], spe_rank=4)  # fmt: skip
    module = MLoRE(small["in_channels"], [16] * 4, small["task_channels"], image_size=(48, 64),
                   embed_dim=20, rank_list=[2, 3, 5], spe_rank=4, topk=2)  # fmt: skip
    assert decoders.mlore_parameter_count(**small) == sum(p.numel() for p in module.parameters())
    implied = decoders.mlore_parameter_count(**decoders.PASCAL_VIT_LARGE)
    assert implied == decoders.MLORE_PASCAL_VIT_LARGE  # the docstring's hand computation
    assert decoders.built_mlore_parameters(**decoders.PASCAL_VIT_LARGE) == implied


def test_peers_table_runs_every_entry_and_streamed_holds_no_jacobian():
    from bench import peers

    table = peers.peers_table(peers.Settings.tiny())
    names = table.column("entry")
    assert names[:4] == ["plain sum of losses", "mtl param stored", "mtl param streamed", "mtl rep"]
    assert names[4:] == ["TorchJD autojac", "TorchJD autogram"]  # the dev extra installs it
    assert all(r > 0 for r in table.column("step time / plain"))
    memory = dict(zip(names, table.column("peak over step start (MiB)"), strict=True))
    if not math.isnan(memory["mtl param stored"]):
        # the stored T x P Jacobian (5 x 1.9M floats, 36 MiB) is what streamed never holds;
        # the rest of a step's peak (allocator, activations) varies with the machine's load
        jacobian_mib = 5 * 1.9e6 * 4 / 2**20
        assert memory["mtl param stored"] > jacobian_mib > memory["mtl param streamed"], memory


def test_the_invpt_reference_pipeline_gives_crop_sized_training_tensors(tmp_path):
    """The data benchmark's reference does InvPT's work: every map at the crop size, semseg
    minus one with 255 for unlabelled and padded pixels, depth divided by the scale."""
    from bench import invpt_pipeline
    from mtl.data.formats import write_nyud
    from mtl.data.nyud import NYUDDataset

    written = write_nyud(tmp_path, {"train": ["a"]}, variant="atrc", size=(60, 80))
    files = NYUDDataset(tmp_path, "train", ["semseg", "depth", "normals", "edge"]).files("a")
    raw = invpt_pipeline.nyud_sample(files)
    torch.manual_seed(0)
    scale = 0.5 + 1.5 * float(torch.rand(()))  # the first draw, as the pipeline makes it
    torch.manual_seed(0)
    out = invpt_pipeline.train_transform(raw, (128, 192))  # larger than any rescaled 60x80
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image": (3, 128, 192), "semseg": (1, 128, 192), "depth": (1, 128, 192),
        "normals": (3, 128, 192), "edge": (1, 128, 192),
    }  # fmt: skip
    labels = set(torch.unique(out["semseg"]).tolist())
    assert 255 in labels and labels - {255} <= set(range(40))
    valid = written["a"]["depth"][written["a"]["depth"] > 0]
    depth = out["depth"][(out["depth"] != 255) & (out["depth"] != 0)]
    assert depth.min() >= valid.min() / scale - 1e-4 and depth.max() <= valid.max() / scale + 1e-4
