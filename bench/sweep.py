"""Training-recipe sweep at a fixed step budget: each variant overrides the model config and TrainConfig fields,
trains in its own process (several at once, sharing the CPU or one GPU) and is scored by the trainer's own
evaluation on the **val** split, so that a choice made here is never tuned on the test split the benchmark reports.

    python bench/sweep.py --spec bench/sweeps/recipe.json --work runs/sweep-recipe --workers 8 --threads 2
    python bench/sweep.py --spec bench/sweeps/recipe.json --results docs/sweep-recipe.json --write-section \
        --where "one H100, 16 cores" --date 2026-11-23 --command "..."  # results measured elsewhere

The spec is a JSON list of variants: {"name": str, "model": {config overrides, nested dicts merged},
"train": {TrainConfig fields, e.g. "lr", "weight_decay", "augment": {...}, "nclip": {...}}, "seeds": [0, ...]}.
Results (one row per variant and seed: val metrics, FLOPs per sample, steps) go to WORK/sweep.json (or --results),
merged with earlier results, so a sweep resumes where it stopped; a table of mean ± half-range over seeds is printed
and, with --write-section, written to the `sweep` section of docs/BENCHMARKS.md (or to --section under --title: one
section per spec). FLOPs per sample is the budget to compare against the default: on the CPU, training time is
roughly proportional to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectives import mean_spread
from bench.report import markdown_table, write_section

METRICS = {  # table columns: the emoji label sets; each result row keeps every metric of the evaluation
    "retrieval/t2i_r1": "t→i R@1", "zeroshot/category/top1": "ZS cat", "zeroshot/subcategory/top1": "ZS subcat",
    "linear_probe/subcategory": "LP subcat", "linear_probe/category": "LP cat",
    "zeroshot_by_group/subcategory/top1": "ZS subcat per emoji", "linear_probe_by_group/subcategory": "LP subcat per emoji",
    "clusters/image/clusters_used_frac": "clusters used",
}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def model_file(variant: dict, base: str, work: Path) -> str:
    """A JSON architecture file for the variant's model overrides (or the base config as given if it has none)."""
    if not variant.get("model"):
        return base
    from training.model import load_config

    config = load_config(base)  # a shipped config's name or a JSON file, as `train --model` takes it
    data = merged(config.to_dict(), variant["model"])
    data["name"] = f"{config.name}-{variant['name']}"
    path = work / f"{variant['name']}.model.json"
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def run_one(variant: dict, seed: int, data: str, work: Path, base: str, threads: int) -> dict:
    """Train one variant with one seed; the val metrics of its final evaluation and its compute budget."""
    import torch

    torch.set_num_threads(threads)
    from training.trainer import TrainConfig, train

    fields = merged({"data": data, "model": model_file(variant, base, work), "seed": seed, "eval_every": 0,
                     "eval_split": "val", "precision": "fp32", "resume": False, "progress": False,
                     "checkpoint_every": 10**9}, variant.get("train", {}))
    fields["output"] = str(work / f"{variant['name']}-s{seed}")
    summary = train(TrainConfig.from_dict(fields))
    return {"name": variant["name"], "seed": seed, "objective": summary["objective"],
            "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": summary["steps"],
            "flops_per_sample": summary["flops_per_sample"], "parameters": summary["parameters"],
            "train_seconds": summary["train_seconds"],
            **summary["eval"]}


def table(rows: list[dict], reference: str | None, order: list[str] = ()) -> str:
    """Mean ± half-range over seeds per variant (in `order`, then the rest), in percent; FLOPs per sample relative
    to the reference variant."""
    present = dict.fromkeys(r["name"] for r in rows)
    names = [n for n in order if n in present] + [n for n in present if n not in order]
    ref_flops = next((r["flops_per_sample"] for r in rows if r["name"] == reference), None)
    out = []
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        line = [name, mine[0].get("objective", "?"), str(len(mine))]
        for key in METRICS:
            values = [r[key] for r in mine if key in r]
            line.append(mean_spread(values, percent=True) if values else "–")
        flops = mine[0]["flops_per_sample"]
        line.append(f"{flops / ref_flops:.2f}" if ref_flops else f"{flops:.3g}")
        out.append(line)
    return markdown_table(["variant", "objective", "seeds", *METRICS.values(), "FLOPs × ref"], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="JSON list of variants")
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--work", default="runs/sweep")
    parser.add_argument("--model", default="small", help="base architecture config")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: the cores shared out)")
    parser.add_argument("--reference", default="lr1e-3", help="variant whose FLOPs the table divides by")
    parser.add_argument("--results", help="results file (default WORK/sweep.json)")
    parser.add_argument("--write-section", action="store_true", help="write the table to docs/BENCHMARKS.md")
    parser.add_argument("--section", default="sweep",
                        help="docs/BENCHMARKS.md section the table goes to (one per spec; default: the recipe sweep's)")
    parser.add_argument("--title", default="Training recipe sweep (val split)", help="that section's heading")
    parser.add_argument("--where", help="machine the results were measured on, if not this one")
    parser.add_argument("--date", help="date of the measurement, if not today")
    parser.add_argument("--command", help="the command that measured the results, if not this one")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    if not isinstance(spec, list) or not all(isinstance(v, dict) for v in spec):
        parser.error("--spec must be a JSON list of variant objects")
    names = [v.get("name", "") for v in spec]
    bad = [n for n in names if not re.fullmatch(r"[\w.+-]+", n)]
    if bad or len(set(names)) != len(names):
        parser.error(f"variant names must be unique and made of letters, digits, '.', '+', '-' or '_': {names}")
    if not re.fullmatch(r"[\w-]+", args.section):
        parser.error(f"--section must be made of letters, digits, '-' or '_': {args.section!r}")
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be at least 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # workers' numpy/sklearn too:
        os.environ.setdefault(var, str(args.threads))  # oversubscribed BLAS threads slow every worker down
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else work / "sweep.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["name"], r["seed"]) for r in rows}
    jobs = [(v, s) for v in spec for s in v.get("seeds", [0]) if (v["name"], s) not in done]
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, v, s, args.data, work, args.model, args.threads): (v["name"], s)
                   for v, s in jobs}
        for future in concurrent.futures.as_completed(futures):
            name, seed = futures[future]
            try:
                rows.append(future.result())
            except (RuntimeError, ValueError, OSError) as exc:  # one broken variant keeps the others
                print(f"{name} seed {seed} failed: {exc!r}", flush=True)
                continue
            results_path.write_text(json.dumps(rows, indent=1))
            print(f"done {name} seed {seed} ({len(rows)} rows)", flush=True)
    body = table(rows, args.reference, [v["name"] for v in spec])
    print(body)
    if args.write_section:
        intro = (f"Model `{args.model}`, {len(rows)} runs; each variant overrides the defaults as `{args.spec}` "
                 "says and is scored on the **val** split (held-out emoji, never the test split the objectives "
                 "table reports), mean ± half-range over seeds, in percent. FLOPs × ref: training FLOPs per "
                 f"sample relative to `{args.reference}`, the budget that sets CPU training time.\n\n")
        taken = {"command": args.command, "where": args.where, "date": args.date}
        write_section(args.section, args.title, intro + body,
                      **{k: v for k, v in taken.items() if v})


if __name__ == "__main__":
    main()
