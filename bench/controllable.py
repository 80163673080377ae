"""Controllable compute: one slimmable model at a grid of FLOPs budgets and task preferences.

    python -m bench.controllable [--tiny] [--out outputs/bench/controllable]

Trains one model with ``model/slim=on`` (ViT-Tiny/16, conv heads, semseg + depth + normals on
the built-in synthetic scenes, CPU), then for every budget and preference: the configuration
``python -m mtl.control`` picks (`mtl.slim.search`), its counted FLOPs and parameters (of the
exported dense sub-network) and each task's main validation score at those widths. Without
``--tiny`` it also trains, for the equal preference, a dense model of the chosen widths from
scratch with the same schedule (``model.slim.fixed``: a separately trained model of that size).

Controllability (the paper's definition is not public; ours): for each preference that is not
uniform and each budget below 1, each task's score normalised by the same task's score of the
full-width model (s / s_full for higher-is-better scores, s_full / s otherwise), the Spearman
rank correlation between the preference weights and these normalised scores across the tasks;
the figure is the mean over those (budget, preference) pairs, from -1 (the order is inverted)
to 1 (the most preferred task keeps the most of its full-width score, and so on). Pairs whose
normalised scores or weights are all tied are left out.

Writes ``controllable.md`` (the tables) and ``controllable.png`` (each task's score against the
budget, one line per preference) in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr

from bench.table import Table

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("semseg", "depth", "normals")


@dataclass
class Settings:
    """Data, schedule and grid of the benchmark."""

    n_train: int = 160
    n_val: int = 48
    image_size: tuple[int, int] = (64, 96)
    epochs: int = 6
    batch_size: int = 8
    budgets: tuple[float, ...] = (0.4, 0.55, 0.7, 0.85, 1.0)
    preferences: tuple[dict[str, float], ...] = (
        {"semseg": 1 / 3, "depth": 1 / 3, "normals": 1 / 3},
        {"semseg": 0.6, "depth": 0.3, "normals": 0.1},
        {"depth": 0.6, "normals": 0.3, "semseg": 0.1},
        {"normals": 0.6, "semseg": 0.3, "depth": 0.1},
    )
    separate: tuple[float, ...] = (0.4, 0.7)  # budgets also trained as dense models
    extra: list[str] = field(default_factory=list)  # more overrides of the training runs

    @classmethod
    def tiny(cls) -> Settings:
        return cls(
            n_train=8,
            n_val=4,
            image_size=(48, 64),
            epochs=1,
            batch_size=4,
            budgets=(0.6, 1.0),
            preferences=cls.preferences[1:3],
            separate=(),
            extra=["+trainer.limit_train_batches=1", "model.slim.random_configs=1"],
        )

    def overrides(self, out: Path, name: str) -> list[str]:
        return [
            f"data.root={out / 'data'}",
            f"data.generate.n_train={self.n_train}",
            f"data.generate.n_val={self.n_val}",
            f"data.image_size=[{self.image_size[0]},{self.image_size[1]}]",
            f"data.batch_size={self.batch_size}",
            f"data.tasks=[{','.join(TASKS)}]",
            "data.num_workers=0",
            "model/backbone=vit_tiny",
            "model/decoder=conv",
            "model/slim=on",
            f"trainer.max_epochs={self.epochs}",
            "trainer.enable_progress_bar=false",
            "trainer.num_sanity_val_steps=0",
            "diagnostics_every_n_steps=0",
            "logger=csv",
            f"paths.output_dir={out / name}",
            f"paths.root_dir={ROOT}",
            *self.extra,
        ]


def train_run(settings: Settings, out: Path, name: str, *overrides: str) -> Path:
    """Train one run of the benchmark; its last checkpoint."""
    from hydra import compose, initialize_config_dir

    from mtl.train import train

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*settings.overrides(out, name), *overrides])
    train(cfg)
    return out / name / "checkpoints" / "last.ckpt"


def main_scores(model: torch.nn.Module, loaded, loader) -> dict[str, float]:
    """Each task's main validation score (dataset-level) of `model`."""
    from mtl.metrics.collection import TaskMetrics
    from mtl.tasks import get_task

    metrics = TaskMetrics(list(TASKS), loaded.num_classes)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            metrics.update(model(batch["image"], list(TASKS)), batch)
    scores = metrics.compute()
    return {t: float(scores[f"{t}/{get_task(t).main_metric}"]) for t in TASKS}


def normalised(scores: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """Each score as a share of the full-width model's (higher: better kept)."""
    from mtl.tasks import get_task

    out = {}
    for task, score in scores.items():
        higher = get_task(task).higher_is_better[get_task(task).main_metric]
        out[task] = score / full[task] if higher else full[task] / score
    return out


def controllability(rows: list[tuple[float, dict, dict]]) -> tuple[float, int]:
    """Mean Spearman correlation between preference and normalised score (module docstring)
    over (budget, preference, normalised scores) rows; and how many rows count."""
    values = []
    for budget, preference, kept in rows:
        p = [preference[t] for t in TASKS]
        k = [kept[t] for t in TASKS]
        if budget >= 1 or len(set(p)) == 1 or len(set(k)) == 1:
            continue
        values.append(float(spearmanr(p, k).statistic))
    return (sum(values) / len(values) if values else float("nan")), len(values)


def run(settings: Settings, out: Path) -> list[Table]:
    from mtl.api import load
    from mtl.slim.cost import cost_table
    from mtl.slim.search import search
    from mtl.slim.widths import at_widths, export_dense
    from mtl.tasks import get_task
    from mtl.train import build_datamodule

    checkpoint = train_run(settings, out, "controllable")
    loaded = load(checkpoint)
    model = loaded.model
    datamodule = build_datamodule(loaded.config.data)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    widths = loaded.config.model.slim.widths
    table = cost_table(model, loaded.input_size, list(widths))
    full = main_scores(model, loaded, loader)
    full_params = sum(p.numel() for p in model.parameters())

    def tag(preference: dict[str, float]) -> str:
        if len(set(preference.values())) == 1:
            return "equal"
        return ">".join(sorted(preference, key=preference.get, reverse=True))

    header = ["budget", "preference", "widths (enc/" + "/".join(TASKS) + ")", "GFLOPs", "params"]
    header += [f"{t} {get_task(t).main_metric}" for t in TASKS]
    grid = Table("Controllable compute: one slimmable model, budgets x preferences", header)
    results: list[tuple[float, dict, dict]] = []
    acting: list[tuple[float, dict, dict]] = []  # pairs whose decoders differ in width
    plotted: dict[str, list[tuple[float, dict[str, float]]]] = {}
    chosen = {}
    for budget, preference in itertools.product(settings.budgets, settings.preferences):
        choice = search(table, budget, preference)
        with at_widths(model, choice.widths):
            scores = main_scores(model, loaded, loader)
        small = export_dense(copy.deepcopy(model), choice.widths)
        params = sum(p.numel() for p in small.parameters())
        w = choice.widths
        grid.rows.append(
            [
                budget,
                tag(preference),
                "/".join(f"{w[r]:g}" for r in ["encoder", *TASKS]),
                choice.flops / 1e9,
                params,
                *(scores[t] for t in TASKS),
            ]
        )
        results.append((budget, preference, normalised(scores, full)))
        if len({w[t] for t in TASKS}) > 1:
            acting.append(results[-1])
        plotted.setdefault(tag(preference), []).append((budget, scores))
        chosen[(budget, tag(preference))] = (choice.widths, scores)
    rho, counted = controllability(results)
    rho_acting, counted_acting = controllability(acting)
    grid.notes += [
        f"Full model: {table.full / 1e9:.3f} GFLOPs per {loaded.input_size[0]}x"
        f"{loaded.input_size[1]} image (counted by torch.utils.flop_counter), {full_params:,} "
        "parameters of the slimmable model (switchable norms included). Budget: a fraction of "
        "the full model's FLOPs; params: the exported dense sub-network.",
        f"Controllability (mean Spearman rank correlation between preference and score kept "
        f"relative to full width, {counted} budget x preference pairs below budget 1): "
        f"{rho:.2f}; on the {counted_acting} pairs where the chosen decoder widths differ "
        f"between tasks: {rho_acting:.2f}.",
    ]
    tables = [grid]
    if settings.separate:
        tables.append(separate_table(settings, out, chosen, full))
    plot(plotted, full, out / "controllable.png")
    return tables


def separate_table(settings: Settings, out: Path, chosen: dict, full: dict) -> Table:
    """Dense models of the widths chosen for the equal preference, trained from scratch with
    the same schedule, against the controllable model at those widths."""
    from mtl.api import load
    from mtl.tasks import get_task
    from mtl.train import build_datamodule

    header = ["budget", "widths", "model"] + [f"{t} {get_task(t).main_metric}" for t in TASKS]
    title = "Controllable model against separately trained models of the same widths"
    result = Table(title, header)
    for budget in settings.separate:
        widths, scores = chosen[(budget, "equal")]
        fixed = "{" + ",".join(f"{k}:{v}" for k, v in widths.items()) + "}"
        path = train_run(settings, out, f"dense_{budget:g}", f"model.slim.fixed={fixed}")
        loaded = load(path)
        datamodule = build_datamodule(loaded.config.data)
        datamodule.setup("validate")
        dense = main_scores(loaded.model, loaded, datamodule.val_dataloader())
        text = "/".join(f"{widths[r]:g}" for r in ["encoder", *TASKS])
        result.rows.append([budget, text, "controllable", *(scores[t] for t in TASKS)])
        result.rows.append([budget, text, "separate", *(dense[t] for t in TASKS)])
    result.notes.append(
        "separate: a dense model of those widths trained from scratch with the same data and "
        "epochs (the controllable model's steps also train the other widths)."
    )
    return result


def plot(series: dict[str, list[tuple[float, dict[str, float]]]], full: dict, path: Path) -> None:
    """Each task's score against the budget, one line per preference (markers and dashes
    differ, since preferences that choose the same widths draw the same points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl.tasks import get_task

    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("v", ":"), ("D", "-")]
    figure, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.2))
    for axis, task in zip(axes, TASKS, strict=True):
        for (name, points), (marker, dash) in zip(series.items(), styles, strict=False):
            points = sorted(points, key=lambda p: p[0])
            x, y = [p[0] for p in points], [p[1][task] for p in points]
            axis.plot(x, y, marker=marker, linestyle=dash, label=name, alpha=0.8)
        axis.axhline(full[task], color="grey", linestyle=":", label="full width")
        spec = get_task(task)
        better = "higher" if spec.higher_is_better[spec.main_metric] else "lower"
        axis.set_title(f"{task} {spec.main_metric} ({better} is better)")
        axis.set_xlabel("budget (share of the full model's FLOPs)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few samples, for tests")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/controllable"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings.tiny() if args.tiny else Settings()
    tables = run(settings, args.out)
    text = "\n".join(t.markdown() for t in tables)
    (args.out / "controllable.md").write_text(text)
    print(text)
    print(f"written: {args.out / 'controllable.md'}, {args.out / 'controllable.png'}")


if __name__ == "__main__":
    main()
