"""Training recipes compared at one budget of CPU time: each recipe's CPU seconds per step measured once, its epochs
set so that its training spends what the reference recipe's epochs spend, then train → export → eval through ONNX
for every (recipe, seed), `jobs` runs side by side. Results are saved after every run, so a rerun (even from a fresh
checkout, when they are kept under docs/) trains only what is missing.

CPU time rather than wall time, so that a machine shared with other work shortens no recipe; one thread per
training process, waiting threads asleep rather than spinning, so that CPU time measures work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.objectives import heldout_cluster_stats

CALIBRATION_STEPS = (5, 35)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A name, the data set it trains on and its extra `train` arguments. `same_model`: it trains the reference's
    model, so its steps cost what the reference's do (within the few milliseconds of an augmentation) and it takes
    as many steps, uncalibrated: on a loaded machine, two calibrations of one model differ by 15–20%."""

    name: str
    data: str
    args: tuple[str, ...] = ()
    same_model: bool = False


def cli(*args: str) -> float:
    """Run `xclip-serve ARGS`; the CPU seconds (user + system) it and its children spent."""
    process = subprocess.Popen([sys.executable, "-m", "xclip_serve.cli", *args], env=ENV)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, args)
    return usage.ru_utime + usage.ru_stime


def train_args(recipe: Recipe, run: Path, objective: str, seed: int, epochs: int, max_steps=None) -> list[str]:
    return ["train", "--data", recipe.data, "--output", str(run), "--model", "small", "--objective", objective,
            "--epochs", str(epochs), "--seed", str(seed), "--eval-every", "0", "--no-resume", *recipe.args,
            *(["--max-steps", str(max_steps)] if max_steps else [])]


def calibrate(recipe: Recipe, work: Path, epochs: int) -> tuple[float, float]:
    """A recipe's CPU seconds per training step and its fixed CPU seconds (start-up, data loading, a locked tower's
    outputs computed once, the final evaluation), from two short runs: their difference and its intercept."""
    spent = [cli(*train_args(recipe, work / f"calibrate-{recipe.name}-{steps}", "xclip", 0, epochs, max_steps=steps))
             for steps in CALIBRATION_STEPS]
    per_step = (spent[1] - spent[0]) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
    return per_step, spent[0] - CALIBRATION_STEPS[0] * per_step


def steps_per_epoch(data: str, batch_size: int = 64) -> int:
    """Training steps in one epoch of a data set's train split."""
    from core import data as datasets

    return max(1, sum(1 for _ in datasets.iter_samples(data, split="train")) // batch_size)


def budget(recipes: list[Recipe], reference: Recipe, reference_epochs: int, work: Path) -> dict:
    """Epochs per recipe so that each spends the CPU time of `reference_epochs` epochs of `reference`: its steps,
    and what it spends once beyond the reference's fixed cost (see `epochs_for`)."""
    reference_cost = calibrate(reference, work, reference_epochs)
    cost = {r.name: reference_cost if r.same_model or r == reference else calibrate(r, work, reference_epochs)
            for r in recipes}
    budget_ = {"epochs": {}, "cpu_seconds_per_step": {n: c[0] for n, c in cost.items()},
               "extra_fixed_cpu_seconds": {n: c[1] - reference_cost[1] for n, c in cost.items()},
               "scratch_epochs": reference_epochs}
    for recipe in recipes:
        budget_["epochs"][recipe.name] = epochs_for(recipe, reference, reference_epochs, reference_cost,
                                                    cost[recipe.name])
    return budget_


def epochs_for(recipe: Recipe, reference: Recipe, reference_epochs: int, reference_cost: tuple[float, float],
               cost: tuple[float, float]) -> int:
    """The epochs of `recipe` whose CPU time, steps plus fixed cost beyond the reference's, is that of
    `reference_epochs` epochs of `reference`. Costs: (per step, fixed), measured back to back."""
    spend = reference_epochs * steps_per_epoch(reference.data) * reference_cost[0]
    extra = max(0.0, cost[1] - reference_cost[1])  # e.g. a locked tower's outputs, computed once
    return max(1, round((spend - extra) / (steps_per_epoch(recipe.data) * cost[0])))


def recalibrate(results: dict, recipe: Recipe, reference: Recipe, work: Path) -> None:
    """Re-measure one recipe (after a change to what it runs) against the reference, back to back, and set its
    epochs from them; its costs are stored on the scale of the reference's first measurement. Drops its runs."""
    budget_ = results["budget"]
    ref_now, cost_now = (calibrate(r, work, budget_["scratch_epochs"]) for r in (reference, recipe))
    budget_["epochs"][recipe.name] = epochs_for(recipe, reference, budget_["scratch_epochs"], ref_now, cost_now)
    scale = budget_["cpu_seconds_per_step"][reference.name] / ref_now[0]
    budget_["cpu_seconds_per_step"][recipe.name] = cost_now[0] * scale
    budget_.setdefault("extra_fixed_cpu_seconds", {})[recipe.name] = (cost_now[1] - ref_now[1]) * scale
    results.get("runs", {}).pop(f"{recipe.name}-xclip", None)


def run_one(recipe: Recipe, objective: str, seed: int, epochs: int, work: Path, eval_data: str,
            splits: tuple[str, ...]) -> dict:
    """Train, export and evaluate one recipe and seed: the first split's metrics at the top level, the others
    under their split's name, cluster use on the held-out images, training CPU and wall seconds."""
    stem = work / f"{recipe.name}-{objective}-s{seed}"
    bundle = Path(f"{stem}-bundle")
    start = time.perf_counter()
    train_cpu = cli(*train_args(recipe, stem, objective, seed, epochs))
    train_seconds = time.perf_counter() - start
    cli("export", "--run", str(stem), "--output", str(bundle), "--data", recipe.data, "--overwrite")
    by_split = {}
    for split in splits:
        metrics_file = Path(f"{stem}-{split}.json")
        cli("eval", "--bundle", str(bundle), "--data", eval_data, "--split", split, "--output", str(metrics_file))
        by_split[split] = json.loads(metrics_file.read_text())
    clusters = heldout_cluster_stats(bundle, eval_data)
    return {**by_split[splits[0]], **{s: by_split[s] for s in splits[1:]}, "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu, "epochs": epochs, "clusters_used_frac": clusters.get("clusters_used_frac"),
            "measured": measured(stem)}


def measured(run: Path) -> str:
    """When and how a run trained: its date, precision and the CPU's widest vector extension (CPU seconds and, with
    bf16, the results are comparable only between runs that share them)."""
    precision = json.loads((run / "train_config.json").read_text())["train"]["precision"]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    vector = next((f for f in ("avx512f", "avx2") if f in flags), "other")
    return f"{time.strftime('%Y-%m-%d')} {precision} {vector}"


@dataclasses.dataclass
class BudgetBench:
    """The (recipe, objective, seed) runs still missing from `results["runs"]`, trained `jobs` at a time; each
    result saved to `path` and `report`ed as it lands."""

    results: dict
    path: Path
    work: Path
    seeds: list[int]
    jobs: int
    eval_data: str
    report: Callable[[dict], None]
    splits: tuple[str, ...] = ("test",)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def missing(self, recipes: list[Recipe], objective: str) -> list[tuple[Recipe, str, int]]:
        """Seed-major, so that every recipe has its first seeds before any has its last."""
        runs = self.results.get("runs", {})
        return [(r, objective, seed) for seed in self.seeds for r in recipes
                if str(seed) not in runs.get(f"{r.name}-{objective}", {})]

    def drop(self, keys: list[str]) -> None:
        """Forget the saved runs of these rows (`recipe-objective`), so that they are trained again."""
        for key in keys:
            if self.results.get("runs", {}).pop(key, None) is None:
                raise SystemExit(f"--redo {key}: no such row in {self.path}")

    def run(self, todo: list[tuple[Recipe, str, int]]) -> None:
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(lambda job: self.one(*job), todo))

    def one(self, recipe: Recipe, objective: str, seed: int) -> None:
        metrics = run_one(recipe, objective, seed, self.results["budget"]["epochs"][recipe.name], self.work,
                          self.eval_data, self.splits)
        with self.lock:
            self.results.setdefault("runs", {}).setdefault(f"{recipe.name}-{objective}", {})[str(seed)] = metrics
            self.save()
            self.report(self.results)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1) + "\n")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def mean_of(results: dict, key: str, metric: str = "retrieval/t2i_r1", split: str | None = None) -> float:
    """The mean of one metric over a recipe's finished seeds (of `split`'s metrics when given)."""
    runs = [r[split] if split else r for r in results.get("runs", {}).get(key, {}).values()]
    return sum(r[metric] for r in runs) / max(len(runs), 1)


def table_rows(results: dict, seeds: list[int], cells: Callable[[list[dict]], list[str]]) -> list[list[str]]:
    """One row per recipe with finished seeds: its name (with how many seeds, when not all), epochs, `cells` of
    its runs, and the CPU seconds its training spent."""
    from bench.objectives import mean_spread

    rows = []
    for key, by_seed in results.get("runs", {}).items():
        runs = [by_seed[str(s)] for s in seeds if str(s) in by_seed]
        if runs:
            partial = "" if len(runs) == len(seeds) else f" ({len(runs)} of {len(seeds)} seeds)"
            rows.append([key + partial, str(runs[0]["epochs"]), *cells(runs),
                         mean_spread([r["train_cpu_seconds"] for r in runs], False)])
    return rows


def cost_note(results: dict) -> str:
    """The measured CPU seconds per step of every recipe, for the section's text."""
    cost = results.get("budget", {}).get("cpu_seconds_per_step", {})  # same-model recipes: the reference's
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in cost.items())


def parse_args(doc: str, work: str, extra: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """A budget benchmark's command line: `extra`'s options, then seeds, epochs, jobs, work dir, report-only."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    extra(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="the reference recipe's (the demo's) epochs")
    parser.add_argument("--jobs", type=int, default=2, help="training processes side by side, one thread each")
    parser.add_argument("--work", default=work)
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    parser.add_argument("--redo", nargs="*", default=[], metavar="RECIPE-OBJECTIVE",
                        help="drop these rows' saved runs (e.g. scratch-xclip) and train them again, on this machine")
    return parser.parse_args()
