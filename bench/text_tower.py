"""The pretrained text tower on the emoji data, at the demo's time budget: today's from-scratch xCLIP vs xCLIP with
the genuine all-MiniLM-L6-v2 as its text tower, locked (LiT) and unlocked at a low learning rate, then CLIP with
the better of the two; several seeds each, train → export → eval through ONNX on the test split. First runs the
slow test that checks the real weights. Writes the `text-tower` section of docs/BENCHMARKS.md.

    python bench/text_tower.py --data .cache/data/emoji-16.0.0 --seeds 0 1 2

The budget: the wall time of the from-scratch model's demo epochs. Each recipe's epochs are set once, from its
training throughput timed over a few steps at the start (before any run, on a quiet machine), so that its
training takes about that time; a contended machine then makes a run slower, not shorter. Finished runs are kept in
WORK/results.json: a rerun only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectives import cli, evaluate_test, heldout_cluster_stats, mean_spread
from bench.report import markdown_table, write_section

COLUMNS = {
    "retrieval/t2i_r1": "t→i R@1", "retrieval/t2i_r10": "t→i R@10",
    "retrieval_seen_words/t2i_r1": "t→i R@1 seen-word", "retrieval_novel_words/t2i_r1": "t→i R@1 novel-word",
    "zeroshot/subcategory/top1": "ZS subcat top1", "zeroshot_by_group/subcategory/top1": "ZS subcat per emoji",
    "linear_probe/subcategory": "LP subcat",
}


def recipes(minilm: Path) -> dict[str, list[str]]:
    """name → extra `train` arguments, xCLIP first; CLIP's row copies the better MiniLM recipe later."""
    tower = ["--text-tower", str(minilm)]
    return {"scratch": [], "minilm-locked": [*tower, "--lock-text"],
            "minilm-unlocked": [*tower, "--init-lr-scale", "0.1"]}


def train_args(args, run: Path, objective: str, seed: int, extra: list[str], epochs: int, max_steps=None) -> list:
    return ["train", "--data", args.data, "--output", str(run), "--model", "small", "--objective", objective,
            "--epochs", str(epochs), "--seed", str(seed), "--eval-every", "0", "--no-resume", *extra,
            *(["--max-steps", str(max_steps)] if max_steps else [])]


def samples_per_second(args, name: str, extra: list[str], steps: int = 25) -> float:
    """Training throughput of a recipe over `steps` steps (from the run's own summary)."""
    run = Path(args.work) / f"calibrate-{name}"
    cli(*train_args(args, run, "xclip", 0, extra, args.epochs, max_steps=steps))
    return json.loads((run / "metrics.json").read_text())["samples_per_second"]


def budgets(args, all_recipes: dict[str, list[str]]) -> dict[str, int]:
    """Epochs per recipe so that each trains as long as the from-scratch recipe's demo epochs."""
    path = Path(args.work) / "epochs.json"
    if path.exists():
        return json.loads(path.read_text())
    rates = {name: samples_per_second(args, name, extra) for name, extra in all_recipes.items()}
    epochs = {name: max(1, round(args.epochs * rate / rates["scratch"])) for name, rate in rates.items()}
    path.write_text(json.dumps({**epochs, "rates": rates}, indent=1))
    return epochs


def run_one(args, name: str, objective: str, seed: int, extra: list[str], epochs: int) -> dict:
    run, bundle = Path(args.work) / f"{name}-{objective}-s{seed}", Path(args.work) / f"{name}-{objective}-s{seed}-bundle"
    start = time.perf_counter()
    cli(*train_args(args, run, objective, seed, extra, epochs))
    train_seconds = time.perf_counter() - start
    cli("export", "--run", str(run), "--output", str(bundle), "--data", args.data, "--overwrite")
    metrics = evaluate_test(f"{name}-{objective}", seed, args)
    clusters = heldout_cluster_stats(bundle, args.data)
    return {**metrics, "train_seconds": train_seconds, "epochs": epochs,
            "clusters_used_frac": clusters.get("clusters_used_frac")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="the from-scratch recipe's (the demo's) epochs")
    parser.add_argument("--work", default="runs/bench-text-tower")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                    "training/tests/test_text_tower.py"], check=True)
    minilm = Path(subprocess.run([sys.executable, "-m", "xclip_serve.cli", "data", "minilm"], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1])
    all_recipes = recipes(minilm)
    epochs = budgets(args, all_recipes)
    results_path = Path(args.work) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    plan = [(name, "xclip") for name in all_recipes]
    for name, objective in [*plan, ("best", "clip")]:
        if name == "best":  # CLIP with the MiniLM recipe that did better at t→i R@1
            name = max(("minilm-locked", "minilm-unlocked"), key=lambda n: mean_of(results, f"{n}-xclip"))
        key = f"{name}-{objective}"
        for seed in args.seeds:
            if str(seed) not in results.get(key, {}):
                results.setdefault(key, {})[str(seed)] = run_one(args, name, objective, seed, all_recipes[name],
                                                                 epochs[name])
                results_path.write_text(json.dumps(results, indent=1))
    write(args, results, epochs)


def mean_of(results: dict, key: str, metric: str = "retrieval/t2i_r1") -> float:
    runs = results.get(key, {}).values()
    return sum(r[metric] for r in runs) / max(len(runs), 1)


def write(args, results: dict, epochs: dict) -> None:
    headers = ["recipe", "epochs", *COLUMNS.values(), "prototypes used", "train s"]
    rows = []
    for key, by_seed in results.items():
        runs = [by_seed[str(s)] for s in args.seeds if str(s) in by_seed]
        rows.append([key, str(runs[0]["epochs"]), *(mean_spread([r[k] for r in runs], True) for k in COLUMNS),
                     mean_spread([r["clusters_used_frac"] for r in runs], True) if runs[0]["clusters_used_frac"]
                     is not None else "–", mean_spread([r["train_seconds"] for r in runs], False)])
    rates = epochs.get("rates", {})
    body = (f"Model `small` image tower; the text tower our 3-layer one (scratch) or all-MiniLM-L6-v2 (22.7 M "
            f"parameters) under a new projection; seeds {args.seeds}, mean ± half-range; test split through ONNX. "
            f"Budget: {args.epochs} epochs of the scratch recipe; the others' epochs train for about as long "
            f"(measured samples/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + ").\n\n"
            + markdown_table(headers, rows) + "\n")
    print(body)
    write_section("text-tower", "Pretrained text tower (all-MiniLM-L6-v2) vs from scratch (emoji, demo budget)",
                  body)


if __name__ == "__main__":
    main()
