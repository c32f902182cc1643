"""PNG plots of a run from its `metrics.jsonl`: loss terms, collapse indicators and evaluation curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

EVAL_KEYS = ("retrieval/t2i_r1", "retrieval/i2t_r1", "zeroshot/subcategory/top1", "zeroshot/category/top1",
             "zeroshot_by_group/subcategory/top1", "linear_probe/subcategory", "linear_probe_by_group/subcategory")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) from a run's metrics.jsonl; a step re-run after a resume keeps its last record."""
    steps, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (evals if "eval" in record else steps)[record["step"]] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def _plot_series(ax, steps: list[dict], keys: list[str], title: str) -> None:
    x = [r["step"] for r in steps]
    for key in keys:
        ax.plot(x, [r.get(key, float("nan")) for r in steps], label=key, linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_run(run_dir: Path) -> list[Path]:
    """Write plots/loss.png, plots/clusters.png (nCLIP/xCLIP) and plots/eval.png; returns their paths."""
    steps, evals = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    if steps:
        loss_keys = ["loss"] + sorted(k for k in steps[-1] if k.endswith("_loss"))
        written.append(_save(out_dir / "loss.png", lambda ax: _plot_series(ax, steps, loss_keys, "training loss")))
    if steps and "image_clusters_used" in steps[-1]:
        written.append(_save(out_dir / "clusters.png", lambda ax: _plot_clusters(ax, steps)))
    if evals:
        rows = [{"step": r["step"], **r["eval"]} for r in evals]
        keys = [k for k in EVAL_KEYS if k in rows[-1]]
        written.append(_save(out_dir / "eval.png", lambda ax: _plot_series(ax, rows, keys, "evaluation")))
    return written


def _plot_clusters(ax, steps: list[dict]) -> None:
    _plot_series(ax, steps, ["image_mean_entropy", "image_entropy_of_mean", "text_mean_entropy",
                             "text_entropy_of_mean"], "nCLIP collapse indicators (nats; batch)")
    twin = ax.twinx()
    twin.plot([r["step"] for r in steps], [r["image_clusters_used"] for r in steps], "k:", linewidth=1,
              label="image clusters used")
    twin.set_ylabel("prototypes that are some sample's argmax")


def _save(path: Path, draw) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
