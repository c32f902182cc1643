"""bench/prompts.py: template sets are scored on val exactly as `eval --bundle` scores its prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.prompts import score_bundle, table
from training.bundle_eval import evaluate_bundle
from training.testing import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(shapes_data, tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("prompts"), "xclip", data=shapes_data)


def test_each_set_scores_as_eval_bundle_scores_those_templates(bundle, shapes_data):
    sets = {"plain": ["{}"], "pair": ["a {} shape", "something {}"]}
    scores = score_bundle(bundle, str(shapes_data), "val", sets)
    assert set(scores) == {"plain", "pair"}
    for name, templates in sets.items():
        full = evaluate_bundle(bundle, str(shapes_data), split="val", templates=templates)
        expected = {k: v for k, v in full.items() if k.startswith(("zeroshot/", "zeroshot_by_group/"))}
        assert scores[name] == pytest.approx(expected) and "zeroshot/shape/top1" in expected


def test_table_has_a_line_per_objective_and_set_with_the_seed_spread():
    def row(objective, value):
        return {"objective": objective, "metrics": {"one": {"zeroshot/shape/top1": value,
                                                            "zeroshot_by_group/shape/top1": value / 2}}}

    headers, lines = table([row("clip", 0.4), row("clip", 0.6), row("xclip", 0.3)], {"one": ["a {}"]})
    assert headers == ["objective", "templates", "bundles", "ZS shape per emoji", "ZS shape"]
    assert lines == [["clip", "`a {}`", "2", "25.0 ± 5.0", "50.0 ± 10.0"], ["xclip", "`a {}`", "1", "15.0", "30.0"]]


def test_a_set_without_exactly_one_placeholder_is_refused(bundle, tmp_path):
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"bad": ["no placeholder"]}))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "prompts.py"), "--bundles", str(bundle),
                           "--sets", str(sets)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "sets.json" in done.stderr and "{}" in done.stderr
