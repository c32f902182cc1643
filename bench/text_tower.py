"""The pretrained text tower on the emoji data, at the demo's training budget: today's from-scratch xCLIP vs xCLIP
with the genuine all-MiniLM-L6-v2 as its text tower, locked (LiT) and unlocked at a low learning rate, then CLIP
with the better of the two, then scratch again for the CPU time that recipe actually spent; several seeds each,
train → export → eval through ONNX on the test split. First runs the slow test that checks the real weights. Writes
the `text-tower` section of docs/BENCHMARKS.md.

    python bench/text_tower.py --data .cache/data/emoji-16.0.0 --seeds 0 1 2 --jobs 2

The budget is the CPU time of the from-scratch recipe's demo epochs: each recipe's epochs are set from its CPU per
step on short runs (bench/budget.py), and the table reports what the full runs spent. Finished runs are kept in
docs/text-tower.json, and the section is rewritten after every run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.budget as bb
from bench.budget import BudgetBench, Recipe, load, mean_of, table_rows
from bench.objectives import mean_spread
from bench.report import markdown_table, write_section

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "text-tower.json"
COMMAND = "python bench/text_tower.py --data .cache/data/emoji-16.0.0 --seeds 0 1 2 --jobs 2"
COLUMNS = {
    "retrieval/t2i_r1": "t→i R@1", "retrieval/t2i_r10": "t→i R@10",
    "retrieval_seen_words/t2i_r1": "t→i R@1 seen-word", "retrieval_novel_words/t2i_r1": "t→i R@1 novel-word",
    "zeroshot/subcategory/top1": "ZS subcat top1", "zeroshot_by_group/subcategory/top1": "ZS subcat per emoji",
    "linear_probe/subcategory": "LP subcat",
}


def recipes(data: str, minilm: Path) -> list[Recipe]:
    """xCLIP's three text towers; CLIP's row copies the better MiniLM recipe later."""
    tower = ("--text-tower", str(minilm))
    return [Recipe("scratch", data), Recipe("minilm-locked", data, (*tower, "--lock-text")),
            Recipe("minilm-unlocked", data, (*tower, "--init-lr-scale", "0.1"))]


def options(parser) -> None:
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--recalibrate", nargs="*", default=[], metavar="RECIPE",
                        help="re-measure these recipes against scratch and drop their runs (after a code change)")


def main() -> None:
    args = bb.parse_args(__doc__, "runs/bench-text-tower", options)
    results = load(RESULTS)
    if args.report_only:
        return write(args, results)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                    "training/tests/test_text_tower.py"], check=True)
    minilm = Path(subprocess.run([sys.executable, "-m", "xclip_serve.cli", "data", "minilm"], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1])
    xclip_recipes = recipes(args.data, minilm)
    if "budget" not in results:
        results["budget"] = bb.budget(xclip_recipes, xclip_recipes[0], args.epochs, work)
    for recipe in (r for r in xclip_recipes if r.name in args.recalibrate):
        bb.recalibrate(results, recipe, xclip_recipes[0], work)
        results.get("runs", {}).pop(f"{recipe.name}-clip", None)
    bench = BudgetBench(results, RESULTS, work, args.seeds, args.jobs, args.data, lambda r: write(args, r))
    bench.drop(args.redo)
    bench.save()
    bench.run(bench.missing(xclip_recipes, "xclip"))
    best = max(xclip_recipes[1:], key=lambda r: mean_of(results, f"{r.name}-xclip"))
    bench.run(bench.missing([best], "clip"))
    bench.run(bench.missing([matched_scratch(results, xclip_recipes[0], best)], "xclip"))
    write(args, results)


def matched_scratch(results: dict, scratch: Recipe, best: Recipe) -> Recipe:
    """The scratch recipe for the training CPU time the best MiniLM recipe actually spent, which the short
    calibration runs can misjudge (they stay inside one epoch, so they miss what a run spends per epoch or per
    checkpoint): whether scratch catches up given the same CPU."""
    spent = {name: sum(r["train_cpu_seconds"] for r in results["runs"][f"{name}-xclip"].values())
             / len(results["runs"][f"{name}-xclip"]) for name in (scratch.name, best.name)}
    epochs = results["budget"]["epochs"]
    epochs.setdefault("scratch-matched", round(epochs[scratch.name] * spent[best.name] / spent[scratch.name]))
    return Recipe("scratch-matched", scratch.data, scratch.args)


def write(args, results: dict) -> None:
    headers = ["recipe", "epochs", *COLUMNS.values(), "prototypes used", "measured", "train wall s", "train CPU s"]
    rows = table_rows(results, args.seeds, lambda runs: [
        *(mean_spread([r[k] for r in runs], True) for k in COLUMNS),
        mean_spread([r["clusters_used_frac"] for r in runs], True) if runs[0]["clusters_used_frac"] is not None
        else "–", ", ".join(sorted({r["measured"] for r in runs})),
        mean_spread([r["train_seconds"] for r in runs], False)])
    epochs = results.get("budget", {}).get("scratch_epochs", args.epochs)
    body = (f"Model `small` image tower; the text tower our 3-layer one (scratch) or all-MiniLM-L6-v2 (22.7 M "
            f"parameters) under a new projection; seeds {args.seeds}, mean ± half-range; test split through ONNX. "
            f"Budget: the CPU time of {epochs} epochs of the scratch recipe; each other recipe's epochs were set "
            f"from its CPU seconds per step of 64, measured on short runs ({bb.cost_note(results)}), and the last "
            f"column is what the full runs spent. `scratch-matched` is the scratch recipe given the CPU time that "
            f"the best MiniLM recipe's full runs spent. One thread per training process, "
            f"{args.jobs} side by side; wall time depends on what else the machine ran. Raw results: "
            f"`docs/text-tower.json`.\n\n" + markdown_table(headers, rows) + "\n")
    print(body)
    write_section("text-tower", "Pretrained text tower (all-MiniLM-L6-v2) vs from scratch (emoji, demo budget)",
                  body, command=COMMAND)


if __name__ == "__main__":
    main()
