"""The image side's levers on the emoji data, at the demo's training budget: style augmentations (`--style-augment
light|strong`), a larger input (`--image-size 64`, the art's own resolution) and training on two vendors' art
(`data emoji --vendors google,twitter`), each against today's from-scratch xCLIP; several seeds each, train →
export → eval through ONNX on the val and test splits of the two-vendor data, scored per vendor. Writes the
`image-levers` section of docs/BENCHMARKS.md.

    python bench/image_levers.py --seeds 0 1 2 --jobs 2

For every recipe but `vendors`, Twemoji is a style the model never saw: its columns measure how far the image
tower carries across art styles. Choose on val; the test columns are the report. The budget is the CPU time of the
base recipe's demo epochs (bench/budget.py). Finished runs are kept in docs/image-levers.json, and the section is
rewritten after every run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.budget import BudgetBench, Recipe, budget, cost_note, load, parse_args, table_rows
from bench.objectives import mean_spread
from bench.report import markdown_table, write_section

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "image-levers.json"
VAL_COLUMNS = {"by_vendor/google/retrieval/t2i_r1": "val google t→i R@1",
               "by_vendor/twitter/retrieval/t2i_r1": "val twitter t→i R@1",
               "by_vendor/twitter/zeroshot/subcategory/top1": "val twitter ZS subcat"}
TEST_COLUMNS = {"by_vendor/google/retrieval/t2i_r1": "google t→i R@1",
                "by_vendor/google/zeroshot/subcategory/top1": "google ZS subcat",
                "by_vendor/twitter/retrieval/t2i_r1": "twitter t→i R@1",
                "by_vendor/twitter/zeroshot/subcategory/top1": "twitter ZS subcat",
                "by_vendor/twitter/zeroshot_by_group/subcategory/top1": "twitter ZS subcat per emoji"}


def recipes(google: str, both: str) -> list[Recipe]:
    """Today's recipe first (the budget's reference), then one lever each."""
    return [Recipe("base", google), Recipe("style-light", google, ("--style-augment", "light"), same_model=True),
            Recipe("style-strong", google, ("--style-augment", "strong"), same_model=True),
            Recipe("size-64", google, ("--image-size", "64")), Recipe("vendors", both, same_model=True)]


def build_data(cache: str) -> tuple[str, str]:
    """The default data set and the two-vendor one (built once, cached)."""
    def build(*vendors: str) -> str:
        out = subprocess.run([sys.executable, "-m", "xclip_serve.cli", "data", "emoji", "--cache-dir", cache,
                              *vendors], check=True, capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    return build(), build("--vendors", "google,twitter")


def main() -> None:
    args = parse_args(__doc__, "runs/bench-image-levers", lambda parser: parser.add_argument("--cache-dir", default=".cache/data"))
    results = load(RESULTS)
    if args.report_only:
        return write(args, results)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    google, both = build_data(args.cache_dir)
    all_recipes = recipes(google, both)
    if "budget" not in results:
        results["budget"] = budget(all_recipes, all_recipes[0], args.epochs, work)
    bench = BudgetBench(results, RESULTS, work, args.seeds, args.jobs, both, lambda r: write(args, r),
                        splits=("test", "val"))
    bench.drop(args.redo)
    bench.save()
    bench.run(bench.missing(all_recipes, "xclip"))
    write(args, results)


def write(args, results: dict) -> None:
    headers = ["recipe", "epochs", *VAL_COLUMNS.values(), *(f"**test** {c}" for c in TEST_COLUMNS.values()),
               "train CPU s"]
    rows = table_rows(results, args.seeds, lambda runs: [
        *(mean_spread([r["val"][k] for r in runs], True) for k in VAL_COLUMNS),
        *(mean_spread([r[k] for r in runs], True) for k in TEST_COLUMNS)])
    epochs = results.get("budget", {}).get("scratch_epochs", args.epochs)
    body = (f"xCLIP, model `small` (32 px unless `size-64`), text tower from scratch; trained on Google's Noto art "
            f"(`vendors`: Noto and Twemoji), evaluated through ONNX on the two-vendor data's val and test splits, "
            f"each vendor's images as their own gallery; seeds {args.seeds}, mean ± half-range. Budget: the CPU time "
            f"of {epochs} epochs of `base`: the style and vendor recipes train the same model for as many steps (half "
            f"the epochs for two vendors' images), `size-64` for the epochs that spend as much CPU (measured CPU "
            f"seconds per step of 64: {cost_note(results)}). One thread per training process, {args.jobs} side by side. Raw results: "
            f"`docs/image-levers.json`.\n\n" + markdown_table(headers, rows) + "\n")
    print(body)
    write_section("image-levers", "Image-side levers: style augmentations, 64 px, two vendors (emoji, demo budget)",
                  body, command=f"python bench/image_levers.py --seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs}")


if __name__ == "__main__":
    main()
