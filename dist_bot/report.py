"""`dist-bot report RUN_DIR [RUN_DIR ...]`: plots and a table from runs' metrics.jsonl, no W&B needed.

One run: a 2 x 2 PNG of training loss, learning rate and images/s over steps, and validation top-1/top-5
over epochs. Several runs (an ablation ladder): the same four panels with every run overlaid, the x axis in
(fractional) epochs so runs with different batch sizes line up, and a Markdown table of the final numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.config.get("model", {}).get("name", "?")


def load_run(run_dir: str | Path) -> Run:
    """A run folder's metrics; a step logged twice (a run that crashed after logging it) counts once: the last."""
    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path} has no metrics.jsonl: give run folders, i.e. <run.out_dir>/<run.name>")
    by_key: dict[tuple[str, int], dict] = {}
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_key[(rec["split"], int(rec["step"]))] = rec
        except (ValueError, KeyError) as e:
            raise UserError(f"{metrics}:{n} is not a dist_bot metrics line ({e}): {line[:80]!r}") from None
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    recs = sorted(by_key.values(), key=lambda r: r["step"])
    # the folder the user named, not config's run.name: a copied or renamed run folder keeps its old run.name
    name = path.resolve().name
    return Run(path, name, config, [r for r in recs if r["split"] == "train"], [r for r in recs if r["split"] == "val"])


def fractional_epochs(train: list[dict]) -> list[float]:
    """Each training line's position in epochs (epoch 0 starting at 0), from the last step logged per epoch."""
    ends: dict[int, int] = {}
    for r in train:
        ends[r["epoch"]] = max(ends.get(r["epoch"], 0), r["step"])
    epochs = sorted(ends)
    lengths = [ends[e] - ends.get(e - 1, 0) for e in epochs]
    per_epoch = statistics.median(lengths[:-1] or lengths) or 1  # the last epoch may be unfinished
    return [r["epoch"] + (r["step"] - ends.get(r["epoch"] - 1, r["epoch"] * per_epoch)) / per_epoch for r in train]


def summary(run: Run) -> dict:
    last = run.val[-1] if run.val else {}
    rates = [r["img_per_s"] for r in run.train if "img_per_s" in r]
    return {
        "run": run.name,
        "model": run.model,
        "epochs": (last.get("epoch", -1) + 1) if last else 0,
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "best_top1": max((v["top1"] for v in run.val), default=None),
        "ema_top1": last.get("ema_top1"),  # with model.ema_decay: the EMA's exact evaluation beside the weights'
        "best_ema_top1": max((v["ema_top1"] for v in run.val if "ema_top1" in v), default=None),
        "val_loss": last.get("loss"),
        "img_per_s": statistics.median(rates) if rates else None,
        "steps": run.train[-1]["step"] if run.train else 0,
    }


def markdown_table(rows: list[dict]) -> str:
    cols = ["run", "model", "epochs", "top1", "top5", "best_top1", "val_loss", "img_per_s", "steps"]
    if any(r.get("ema_top1") is not None for r in rows):  # runs with an EMA: its columns beside the weights'
        cols[6:6] = ["ema_top1", "best_ema_top1"]

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(runs: list[Run], out: Path) -> Path:
    """Four panels; one run: over steps (top-1 over epochs), several: overlaid over epochs."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("dist-bot report needs matplotlib: pip install 'dist-bot[report]'") from None
    single = len(runs) == 1
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    panels = [("loss", "training loss"), ("lr", "learning rate"), ("img_per_s", "images / s (all processes)")]
    for run in runs:
        x = [r["step"] for r in run.train] if single else fractional_epochs(run.train)
        for ax, (key, title) in zip(axes.flat, panels, strict=False):
            pts = [(xi, r[key]) for xi, r in zip(x, run.train, strict=True) if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=run.name, linewidth=1)
            ax.set_title(title)
            ax.set_xlabel("step" if single else "epoch")
        ax = axes.flat[3]
        epochs = [v["epoch"] + 1 for v in run.val]
        line = ax.plot(epochs, [v["top1"] for v in run.val], marker="o", label=f"{run.name} top-1")[0]
        ema = [(e, v["ema_top1"]) for e, v in zip(epochs, run.val, strict=True) if "ema_top1" in v]
        if ema:
            ax.plot(*zip(*ema, strict=True), marker="^", linestyle=":", color=line.get_color(), label="EMA top-1")
        if single:
            top5 = [v["top5"] for v in run.val]
            ax.plot(epochs, top5, marker="s", linestyle="--", color=line.get_color(), label="top-5")
        ax.set_title("validation accuracy (%)")
        ax.set_xlabel("epoch")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    if not single or runs[0].val:
        axes.flat[3].legend(fontsize="small")
    if not single:
        axes.flat[0].legend(fontsize="small")
    fig.suptitle(runs[0].name if single else f"{len(runs)} runs")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(run_dirs: list[str], out: str | None = None) -> tuple[Path, str]:
    """Write the PNG (default: RUN_DIR/report.png for one run, ./report.png for several) and return it with
    the Markdown table."""
    runs = [load_run(d) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):  # runs/x and other_runs/x: tell them apart by their parent too
        for r in runs:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    if not any(r.train for r in runs):
        raise UserError(f"no training lines in {', '.join(run_dirs)}: has the run logged a step yet?")
    target = Path(out) if out else (runs[0].path / "report.png" if len(runs) == 1 else Path("report.png"))
    if target.suffix.lower() != ".png":
        raise UserError(f"--out {target}: the plot is a PNG, name it *.png")
    return plot(runs, target), markdown_table([summary(r) for r in runs])
