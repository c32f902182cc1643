"""Zero-shot prompt choice, reproducible: score sets of prompt templates through finished bundles' ONNX files on the
**val** split, per image and per emoji, so that the default prompt is chosen on val and never on the test split the
objectives table reports.

    python bench/prompts.py --bundles runs/bench-objectives-prev/*-bundle --data .cache/data/emoji-16.0.0
    python bench/prompts.py --bundles ... --sets my-sets.json --write-section

Template sets: the built-in ones below, or a JSON object {"name": ["template with {}", ...]} given by --sets. Each
bundle's images are encoded once; every set is then scored on every label set of the data. Rows are objectives ×
template sets, mean ± half-range over the bundles (seeds) of that objective; --write-section writes the table to the
`prompts` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectives import mean_spread
from bench.report import markdown_table, write_section

# The shipped prompt first, then what it was chosen against: the earlier six-template ensemble, and its members.
TEMPLATE_SETS = {
    "a {} emoji": ["a {} emoji"],
    "six-template ensemble": ["{}", "a {} emoji", "an emoji of {}", "{} emoji", "a picture of {}", "an icon of {}"],
    "{}": ["{}"],
    "an emoji of {}": ["an emoji of {}"],
    "{} emoji": ["{} emoji"],
    "a picture of {}": ["a picture of {}"],
    "an icon of {}": ["an icon of {}"],
}
def load_sets(path: str | None) -> dict[str, list[str]]:
    """The template sets to compare: a JSON file's, each checked, else the built-in ones."""
    from core.metrics import check_templates

    if path is None:
        return TEMPLATE_SETS
    sets = json.loads(Path(path).read_text())
    if not isinstance(sets, dict) or not sets:
        raise SystemExit(f"{path}: expected a JSON object of name → list of templates")
    try:
        return {name: list(check_templates(templates)) for name, templates in sets.items()}
    except ValueError as err:
        raise SystemExit(f"{path}: {err}") from None


def score_bundle(bundle_dir: Path, data: str, split: str, sets: dict[str, list[str]]) -> dict[str, dict]:
    """{set name: zero-shot metrics} of one bundle, its images encoded once."""
    from core.evaluation import select_label_sets, zero_shot_metrics
    from training.bundle_eval import open_bundle_eval

    _, encoder, loaded = open_bundle_eval(bundle_dir, data, split)
    eval_set = loaded.eval_set
    image_emb = encoder.encode_images(eval_set.images)["embedding"]
    names = select_label_sets(loaded.label_sets, eval_set, None)
    return {
        set_name: {key: value for name in names for key, value in zero_shot_metrics(
            encoder.encode_texts, image_emb, eval_set, name, loaded.label_sets[name], templates).items()}
        for set_name, templates in sets.items()
    }


def columns(rows: list[dict]) -> dict[str, str]:
    """Top-1 accuracy of every label set scored, per group (emoji) first, then per image: {metric key: header}."""
    keys = {key for r in rows for scores in r["metrics"].values() for key in scores if key.endswith("/top1")}
    names = sorted({key.split("/")[1] for key in keys}, key=lambda n: (n != "subcategory", n))
    out = {}
    for name in names:
        for key, header in ((f"zeroshot_by_group/{name}/top1", f"ZS {name} per emoji"),
                            (f"zeroshot/{name}/top1", f"ZS {name}")):
            if key in keys:
                out[key] = header
    return out


def table(rows: list[dict], sets: dict[str, list[str]]) -> tuple[list[str], list[list[str]]]:
    """One line per objective and template set, mean ± half-range over that objective's bundles."""
    metrics = columns(rows)
    headers = ["objective", "templates", "bundles", *metrics.values()]
    lines = []
    for objective in dict.fromkeys(r["objective"] for r in rows):
        runs = [r for r in rows if r["objective"] == objective]
        for set_name, templates in sets.items():
            values = [r["metrics"][set_name] for r in runs]
            cells = [mean_spread([v[m] for v in values], True) if all(m in v for v in values) else "–"
                     for m in metrics]
            label = f"`{templates[0]}`" if len(templates) == 1 else f"{set_name} ({len(templates)})"
            lines.append([objective, label, str(len(runs)), *cells])
    return headers, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", nargs="+", required=True, help="exported bundle directories")
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--split", default="val", help="split to score on (default val: choose, never on test)")
    parser.add_argument("--sets", help="JSON file {name: [templates]} (default: the built-in sets)")
    parser.add_argument("--results", help="also write the per-bundle results as JSON here")
    parser.add_argument("--write-section", action="store_true", help="write the table to docs/BENCHMARKS.md")
    args = parser.parse_args()

    from tqdm import tqdm

    from core.bundle import load_bundle

    sets = load_sets(args.sets)
    rows = []
    for bundle_dir in tqdm([Path(b) for b in args.bundles], desc="bundles", unit="bundle"):
        objective = load_bundle(bundle_dir).config.objective
        rows.append({"bundle": str(bundle_dir), "objective": objective,
                     "metrics": score_bundle(bundle_dir, args.data, args.split, sets)})
    headers, lines = table(rows, sets)
    text = markdown_table(headers, lines)
    print(text)
    if args.results:
        Path(args.results).write_text(json.dumps(rows, indent=1))
    if args.write_section:
        body = (f"Zero-shot accuracy on the **{args.split}** split of each template set (a set's class embedding is "
                "the renormalised mean of its templates' embeddings), through the bundles' ONNX files; mean ± "
                "half-range over the bundles of each objective. \"Per emoji\": each emoji weighs one, its skin-tone "
                "variants sharing that weight.\n\n" + text)
        print("wrote", write_section("prompts", "Zero-shot prompt choice (val split)", body))


if __name__ == "__main__":
    main()
