"""CLIP vs nCLIP vs xCLIP on the emoji data at the demo budget, several seeds each: train → export → eval (through
ONNX, test split) and nCLIP cluster statistics on all held-out images (val + test). Prints a table and writes the
`objectives` section of docs/BENCHMARKS.md.

    python bench/objectives.py --data .cache/data/emoji-16.0.0 --seeds 0 1 2 [--supervised-reference]

Finished runs are kept in WORK/results.json: a rerun only trains what is missing; `--reevaluate` re-scores the
finished runs' bundles on the test split (minutes, no training) when the evaluation changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import markdown_table, write_section

OBJECTIVES = ("clip", "nclip", "xclip")
SUPERVISED = "supervised"
COLUMNS = {  # metric key → column title
    "retrieval/t2i_r1": "t→i R@1", "retrieval/t2i_r5": "t→i R@5", "retrieval/t2i_r10": "t→i R@10",
    "retrieval_seen_words/t2i_r1": "t→i R@1 seen-word queries",
    "retrieval_novel_words/t2i_r1": "t→i R@1 novel-word queries",
    "retrieval/i2t_r1": "i→t R@1", "zeroshot/category/top1": "ZS cat top1",
    "zeroshot/subcategory/top1": "ZS subcat top1", "zeroshot/subcategory/top5": "ZS subcat top5",
    "zeroshot_by_group/subcategory/top1": "ZS subcat top1 per emoji",
    "linear_probe/subcategory": "LP subcat", "linear_probe_by_group/subcategory": "LP subcat per emoji",
    "linear_probe/category": "LP cat",
}
CLUSTER_COLUMNS = {"clusters_used_frac": "clusters used (held-out)", "entropy_gap": "H(mean)−mean H (nats)"}
TIME_COLUMNS = {"wall_seconds": "wall s (train+export+eval)", "samples_per_second": "samples/s", "mfu": "MFU"}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "xclip_serve.cli", *args], check=True)


def heldout_cluster_stats(bundle: Path, data: str) -> dict:
    """Cluster statistics of the image tower over every held-out (val + test) image."""
    from core import data as datasets
    from core.bundle import load_bundle
    from core.metrics import cluster_stats
    from core.onnx_encoder import OnnxEncoder

    b = load_bundle(bundle)
    if not b.has_clusters:
        return {}
    images = [s.image for split in ("val", "test") for s in datasets.iter_samples(data, split=split)]
    stats = cluster_stats(OnnxEncoder(b, providers="cpu").encode_images(images)["cluster_probs"])
    return {k: stats[k] for k in ("clusters_used", "clusters_used_frac", "mean_entropy", "entropy_of_mean",
                                  "entropy_gap")}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def label_only_data(data: str, work: Path, label: str = "subcategory") -> Path:
    """A copy of the data set whose training captions are only "a {label} emoji": CLIP on it is supervised
    (multi-positive contrastive over the label), the reference for what the labels alone teach this model."""
    out = work / f"data-{label}-only"
    if (out / "captions.jsonl").exists():
        return out
    shutil.copytree(Path(data) / "images", out / "images", copy_function=_link_or_copy, dirs_exist_ok=True)
    rows = [json.loads(line) for line in (Path(data) / "captions.jsonl").read_text().splitlines() if line]
    for row in rows:
        if row.get("split") == "train":
            row["text"] = [f"a {row['labels'][label]} emoji"]
    (out / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def evaluate_test(name: str, seed: int, args) -> dict:
    """`eval` of a run's bundle on the test split of args.data (through ONNX); returns its metrics."""
    bundle, metrics_file = Path(args.work) / f"{name}-s{seed}-bundle", Path(args.work) / f"{name}-s{seed}-test.json"
    cli("eval", "--bundle", str(bundle), "--data", args.data, "--split", "test", "--output", str(metrics_file))
    return json.loads(metrics_file.read_text())


def run_one(objective: str, seed: int, args, data: str | None = None, name: str | None = None) -> dict:
    """Train, export and evaluate one (objective, seed) on `data` (default: args.data); returns its metrics."""
    name, data = name or objective, data or args.data
    run, bundle = Path(args.work) / f"{name}-s{seed}", Path(args.work) / f"{name}-s{seed}-bundle"
    start = time.perf_counter()
    cli("train", "--data", data, "--output", str(run), "--model", args.model, "--objective", objective,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(seed), "--eval-every", "10", "--no-resume")
    cli("export", "--run", str(run), "--output", str(bundle), "--data", args.data, "--overwrite")
    test_metrics = evaluate_test(name, seed, args)
    wall = time.perf_counter() - start
    summary = json.loads((run / "metrics.json").read_text())
    return {**test_metrics, "wall_seconds": wall,
            "samples_per_second": summary["samples_per_second"], "mfu": summary["mfu"],
            **{f"heldout/{k}": v for k, v in heldout_cluster_stats(bundle, args.data).items()}}


def pixel_probe(data: str, image_size: int) -> dict[str, float]:
    """Reference row: the linear probe on raw pixels at the model's input size (train split → test split),
    through the same preprocessing and the same probe as the models' row."""
    from core import data as datasets
    from core.metrics import group_weights, mean_hit, probe_predictions
    from core.preprocess import PreprocessConfig, preprocess_batch

    preprocess = PreprocessConfig(image_size=image_size)
    sets = {split: list(datasets.iter_samples(data, split=split)) for split in ("train", "test")}
    pixels = {split: preprocess_batch([s.image for s in samples], preprocess).reshape(len(samples), -1)
              for split, samples in sets.items()}
    weights = group_weights([s.group for s in sets["test"]])
    results = {}
    for name in ("subcategory", "category"):
        predicted = probe_predictions(pixels["train"], [s.labels[name] for s in sets["train"]], pixels["test"])
        hits = predicted == [s.labels[name] for s in sets["test"]]
        results[f"linear_probe/{name}"] = mean_hit(hits)
        results[f"linear_probe_by_group/{name}"] = mean_hit(hits, weights)
    return results


def mean_spread(values: list[float], percent: bool) -> str:
    scale = 100 if percent else 1
    mean = statistics.fmean(values) * scale
    digits = 1 if percent or mean >= 10 else 3
    if len(values) == 1:  # one seed: no spread to report
        return f"{mean:.{digits}f}"
    spread = (max(values) - min(values)) * scale / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    headers = ["objective", *COLUMNS.values(), *CLUSTER_COLUMNS.values(), *TIME_COLUMNS.values()]
    rows = []
    for objective, runs in results.items():
        row = [objective]
        row += [mean_spread([r[k] for r in runs], True) if k in runs[0] else "–" for k in COLUMNS]
        row += [mean_spread([r[f"heldout/{k}"] for r in runs], k.endswith("frac"))
                if f"heldout/{k}" in runs[0] else "–" for k in CLUSTER_COLUMNS]
        row += [mean_spread([r[k] for r in runs], k == "mfu") for k in TIME_COLUMNS]
        rows.append(row)
    return headers, rows


def reference_row(label: str, probe: dict[str, float], headers: list[str]) -> list[str]:
    values = {COLUMNS[k]: f"{v * 100:.1f}" for k, v in probe.items() if k in COLUMNS}
    return [label, *(values.get(h, "–") for h in headers[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument("--model", default="small")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", default="runs/bench-objectives")
    parser.add_argument("--supervised-reference", action="store_true",
                        help="also train CLIP on captions that are only the subcategory label (a reference row)")
    parser.add_argument("--reference-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reevaluate", action="store_true",
                        help="re-run only the test evaluation of finished runs (their bundles), e.g. after the "
                             "evaluation gained a metric; training time and cluster statistics are kept")
    args = parser.parse_args()
    results_file = Path(args.work) / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    # name → (objective, data, seeds); finished runs are kept in results.json, so the benchmark resumes
    plan = {o: (o, args.data, args.seeds) for o in OBJECTIVES if o in args.objectives}
    if args.supervised_reference:
        plan[SUPERVISED] = ("clip", str(label_only_data(args.data, Path(args.work))), args.reference_seeds)
    for name, (objective, data, seeds) in plan.items():
        for seed in seeds:
            key = f"{name}/{seed}"
            if key not in results:
                results[key] = run_one(objective, seed, args, data=data, name=name)
            elif args.reevaluate:
                results[key] = {**results[key], **evaluate_test(name, seed, args)}
            else:
                continue
            results_file.write_text(json.dumps(results, indent=1))
    labels = {SUPERVISED: f"reference: clip on label-only captions, seeds {args.reference_seeds}"}
    headers, rows = table({labels.get(n, n): [results[f"{n}/{s}"] for s in p[2]] for n, p in plan.items()})
    size = json.loads((Path(args.work) / f"{next(iter(plan))}-s{args.seeds[0]}-bundle" / "preprocess.json")
                      .read_text())["image_size"]  # the models' input size
    rows.append(reference_row(f"raw pixels {size}×{size} (reference)", pixel_probe(args.data, size), headers))
    text = markdown_table(headers, rows)
    print(text)
    first = results[f"{next(iter(plan))}/{args.seeds[0]}"]
    queries = {side: first.get(f"retrieval_{side}_words/queries", "?") for side in ("seen", "novel")}
    note = (f"Model `{args.model}`, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}; mean ± half-range over "
            "seeds. Retrieval, zero-shot and linear probe (LP) on the test split (held-out emoji), through the "
            "exported ONNX files; \"per emoji\": each held-out emoji weighs one, its skin-tone variants sharing "
            "that weight (the plain columns count every image, so an emoji drawn in 26 tones counts 26 times); "
            "cluster statistics of the image tower over all held-out images (val + test). "
            f"Seen-word queries: the {queries['seen']} held-out emoji names whose every word occurs in some training "
            f"caption; novel-word queries: the other {queries['novel']}, each with a word no training caption has "
            "(\"fox face\", most country flags). "
            "References: with `--supervised-reference`, CLIP trained on captions that are only \"a {subcategory} "
            "emoji\" (what the labels alone teach this model in this budget); last, the same linear probe on raw "
            "pixels.\n\n")
    write_section("objectives", "Objectives: CLIP vs nCLIP vs xCLIP (emoji, demo budget)", note + text)


if __name__ == "__main__":
    main()
