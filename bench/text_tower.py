"""The pretrained text tower on the emoji data, at the demo's training budget: today's from-scratch xCLIP vs xCLIP
with the genuine all-MiniLM-L6-v2 as its text tower, locked (LiT) and unlocked at a low learning rate, then CLIP
with the better of the two; several seeds each, train → export → eval through ONNX on the test split. First runs
the slow test that checks the real weights. Writes the `text-tower` section of docs/BENCHMARKS.md.

    python bench/text_tower.py --data .cache/data/emoji-16.0.0 --seeds 0 1 2 --jobs 2

The budget is CPU time, not wall time, so that a machine shared with other work shortens no recipe: the CPU
seconds of the from-scratch recipe's demo epochs. Each recipe's CPU seconds per step are measured once, as the
difference of two short runs (start-up, data loading and the final evaluation cancel), and its epochs are set so
that its training spends about that budget. Every training process runs one thread (`--jobs` of them side by side);
the CPU each run spent is reported beside its wall time. Finished runs are kept in docs/text-tower.json, so a rerun
(even from a fresh checkout) only trains what is missing, and the section is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectives import heldout_cluster_stats, mean_spread
from bench.report import markdown_table, write_section

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "text-tower.json"
COMMAND = "python bench/text_tower.py --data .cache/data/emoji-16.0.0 --seeds 0 1 2 --jobs 2"
CALIBRATION_STEPS = (5, 35)
COLUMNS = {
    "retrieval/t2i_r1": "t→i R@1", "retrieval/t2i_r10": "t→i R@10",
    "retrieval_seen_words/t2i_r1": "t→i R@1 seen-word", "retrieval_novel_words/t2i_r1": "t→i R@1 novel-word",
    "zeroshot/subcategory/top1": "ZS subcat top1", "zeroshot_by_group/subcategory/top1": "ZS subcat per emoji",
    "linear_probe/subcategory": "LP subcat",
}
# one thread per training process, waiting threads asleep rather than spinning: CPU time then measures work
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def recipes(minilm: Path) -> dict[str, list[str]]:
    """name → extra `train` arguments, xCLIP first; CLIP's row copies the better MiniLM recipe later."""
    tower = ["--text-tower", str(minilm)]
    return {"scratch": [], "minilm-locked": [*tower, "--lock-text"],
            "minilm-unlocked": [*tower, "--init-lr-scale", "0.1"]}


def cli(*args: str) -> float:
    """Run `xclip-serve ARGS`; the CPU seconds (user + system) it and its children spent."""
    process = subprocess.Popen([sys.executable, "-m", "xclip_serve.cli", *args], env=ENV)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, args)
    return usage.ru_utime + usage.ru_stime


def train_args(args, run: Path, objective: str, seed: int, extra: list[str], epochs: int, max_steps=None) -> list:
    return ["train", "--data", args.data, "--output", str(run), "--model", "small", "--objective", objective,
            "--epochs", str(epochs), "--seed", str(seed), "--eval-every", "0", "--no-resume", *extra,
            *(["--max-steps", str(max_steps)] if max_steps else [])]


def cpu_seconds_per_step(args, name: str, extra: list[str]) -> float:
    """A recipe's CPU seconds per training step: two short runs, differenced."""
    spent = [cli(*train_args(args, Path(args.work) / f"calibrate-{name}-{steps}", "xclip", 0, extra, args.epochs,
                             max_steps=steps)) for steps in CALIBRATION_STEPS]
    return (spent[1] - spent[0]) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])


def budgets(args, results: dict, all_recipes: dict[str, list[str]]) -> dict:
    """Epochs per recipe so that each spends the CPU time of the from-scratch recipe's demo epochs."""
    if "budget" not in results:
        cost = {name: cpu_seconds_per_step(args, name, extra) for name, extra in all_recipes.items()}
        epochs = {name: max(1, round(args.epochs * cost["scratch"] / c)) for name, c in cost.items()}
        results["budget"] = {"epochs": epochs, "cpu_seconds_per_step": cost, "scratch_epochs": args.epochs}
    return results["budget"]


def run_one(args, name: str, objective: str, seed: int, extra: list[str], epochs: int) -> dict:
    """Train, export and evaluate one recipe and seed; its test metrics, cluster use and training time."""
    stem = Path(args.work) / f"{name}-{objective}-s{seed}"
    run, bundle, metrics_file = stem, Path(f"{stem}-bundle"), Path(f"{stem}-test.json")
    start = time.perf_counter()
    train_cpu = cli(*train_args(args, run, objective, seed, extra, epochs))
    train_seconds = time.perf_counter() - start
    cli("export", "--run", str(run), "--output", str(bundle), "--data", args.data, "--overwrite")
    cli("eval", "--bundle", str(bundle), "--data", args.data, "--split", "test", "--output", str(metrics_file))
    clusters = heldout_cluster_stats(bundle, args.data)
    return {**json.loads(metrics_file.read_text()), "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
            "epochs": epochs, "clusters_used_frac": clusters.get("clusters_used_frac")}


class Bench:
    """The runs still missing, trained `--jobs` at a time; each result saved and reported as it lands."""

    def __init__(self, args, results: dict, all_recipes: dict[str, list[str]]):
        self.args, self.results, self.recipes, self.lock = args, results, all_recipes, threading.Lock()

    def missing(self, name: str, objective: str) -> list[tuple[str, str, int]]:
        done = self.results.get("runs", {}).get(f"{name}-{objective}", {})
        return [(name, objective, seed) for seed in self.args.seeds if str(seed) not in done]

    def run(self, todo: list[tuple[str, str, int]]) -> None:
        with ThreadPoolExecutor(self.args.jobs) as pool:
            list(pool.map(lambda job: self.one(*job), todo))

    def one(self, name: str, objective: str, seed: int) -> None:
        metrics = run_one(self.args, name, objective, seed, self.recipes[name],
                          self.results["budget"]["epochs"][name])
        with self.lock:
            self.results.setdefault("runs", {}).setdefault(f"{name}-{objective}", {})[str(seed)] = metrics
            save(self.results)
            write(self.args, self.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="the from-scratch recipe's (the demo's) epochs")
    parser.add_argument("--jobs", type=int, default=2, help="training processes side by side, one thread each")
    parser.add_argument("--work", default="runs/bench-text-tower")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.report_only:
        return write(args, results)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                    "training/tests/test_text_tower.py"], check=True)
    minilm = Path(subprocess.run([sys.executable, "-m", "xclip_serve.cli", "data", "minilm"], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1])
    all_recipes = recipes(minilm)
    budgets(args, results, all_recipes)
    save(results)
    bench = Bench(args, results, all_recipes)
    bench.run([job for seed in args.seeds for name in all_recipes for job in bench.missing(name, "xclip")
               if job[2] == seed])
    best = max(("minilm-locked", "minilm-unlocked"), key=lambda n: mean_of(results, f"{n}-xclip"))
    bench.run(bench.missing(best, "clip"))
    write(args, results)


def save(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def mean_of(results: dict, key: str, metric: str = "retrieval/t2i_r1") -> float:
    runs = results.get("runs", {}).get(key, {}).values()
    return sum(r[metric] for r in runs) / max(len(runs), 1)


def write(args, results: dict) -> None:
    headers = ["recipe", "epochs", *COLUMNS.values(), "prototypes used", "train CPU s", "train wall s"]
    rows = []
    for key, by_seed in results.get("runs", {}).items():
        runs = [by_seed[str(s)] for s in args.seeds if str(s) in by_seed]
        if not runs:
            continue
        seeds = "" if len(runs) == len(args.seeds) else f" ({len(runs)} of {len(args.seeds)} seeds)"
        rows.append([key + seeds, str(runs[0]["epochs"]), *(mean_spread([r[k] for r in runs], True) for k in COLUMNS),
                     mean_spread([r["clusters_used_frac"] for r in runs], True) if runs[0]["clusters_used_frac"]
                     is not None else "–", mean_spread([r["train_cpu_seconds"] for r in runs], False),
                     mean_spread([r["train_seconds"] for r in runs], False)])
    budget = results.get("budget", {})
    cost = ", ".join(f"{k} {v:.2f}" for k, v in budget.get("cpu_seconds_per_step", {}).items())
    body = (f"Model `small` image tower; the text tower our 3-layer one (scratch) or all-MiniLM-L6-v2 (22.7 M "
            f"parameters) under a new projection; seeds {args.seeds}, mean ± half-range; test split through ONNX. "
            f"Budget: the CPU time of {budget.get('scratch_epochs', args.epochs)} epochs of the scratch recipe; the "
            f"others' epochs spend about as much (measured CPU seconds per step of 64: {cost}). One thread per "
            f"training process, {args.jobs} side by side; wall time depends on what else the machine ran. Raw "
            f"results: `docs/text-tower.json`.\n\n" + markdown_table(headers, rows) + "\n")
    print(body)
    write_section("text-tower", "Pretrained text tower (all-MiniLM-L6-v2) vs from scratch (emoji, demo budget)",
                  body, command=COMMAND)


if __name__ == "__main__":
    main()
