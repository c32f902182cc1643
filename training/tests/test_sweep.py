"""bench/sweep.py: variants override the recipe as written, are scored on val, and a sweep resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.sweep import merged, run_one, table

ROOT = Path(__file__).resolve().parents[2]


def test_merged_overrides_nested_keys_and_keeps_the_rest():
    base = {"lr": 1e-3, "augment": {"crop_scale": [0.7, 1.0], "hflip": False}}
    out = merged(base, {"augment": {"crop_scale": [0.4, 1.0]}, "weight_decay": 0.3})
    assert out == {"lr": 1e-3, "weight_decay": 0.3, "augment": {"crop_scale": [0.4, 1.0], "hflip": False}}
    assert base["augment"]["crop_scale"] == [0.7, 1.0]  # the base is not modified


def test_a_variant_trains_with_its_overrides_and_is_scored_on_val(shapes_data, tmp_path):
    common = {"epochs": 1, "max_steps": 2, "batch_size": 8}
    base = run_one({"name": "base", "train": common}, 0, str(shapes_data), tmp_path, "tiny", 1)
    deeper = run_one({"name": "deeper", "model": {"vision": {"layers": 3}}, "train": {**common, "lr": 1e-4}},
                     0, str(shapes_data), tmp_path, "tiny", 1)
    written = json.loads((tmp_path / "deeper.model.json").read_text())
    assert written["vision"]["layers"] == 3 and written["vision"]["width"] == 32  # rest of `tiny` kept
    run = json.loads((tmp_path / "deeper-s0" / "train_config.json").read_text())
    assert run["train"]["lr"] == 1e-4 and run["train"]["eval_split"] == "val"
    assert deeper["flops_per_sample"] > base["flops_per_sample"]
    assert {"retrieval/t2i_r1", "linear_probe/shape"} <= set(deeper) and deeper["steps"] == 2
    rendered = table([base, deeper], "base")
    assert "| deeper | xclip | 1 |" in rendered and rendered.splitlines()[2].endswith("| 1.00 |")


def test_the_sweep_resumes_without_rerunning_finished_variants(shapes_data, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"name": "a", "seeds": [0, 1], "train": {"epochs": 1, "max_steps": 1,
                                                                         "batch_size": 8}}]))
    command = [sys.executable, str(ROOT / "bench" / "sweep.py"), "--spec", str(spec), "--data", str(shapes_data),
               "--work", str(tmp_path / "work"), "--model", "tiny", "--workers", "2", "--threads", "1",
               "--reference", "a"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads((tmp_path / "work" / "sweep.json").read_text())
    assert sorted(r["seed"] for r in rows) == [0, 1] and "| a | xclip | 2 |" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "done a" not in second.stdout  # nothing left to run
    assert json.loads((tmp_path / "work" / "sweep.json").read_text()) == rows


def test_a_spec_with_a_bad_or_repeated_name_is_refused_before_training(tmp_path):
    for names in (["a", "a"], ["../escape"]):
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps([{"name": n} for n in names]))
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--spec", str(spec),
                               "--work", str(tmp_path / "work")], check=False, capture_output=True, text=True)
        assert done.returncode == 2 and "variant names must be unique" in done.stderr
        assert not (tmp_path / "work" / "sweep.json").exists()


def test_zero_workers_or_threads_are_refused_before_training(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"name": "a"}]))
    for flags in (["--workers", "0"], ["--threads", "0"]):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--spec", str(spec),
                               "--work", str(tmp_path / "work"), *flags], check=False, capture_output=True, text=True)
        assert done.returncode == 2 and "must be at least 1" in done.stderr
        assert not (tmp_path / "work" / "sweep.json").exists()


def test_each_spec_can_write_its_own_benchmarks_section(tmp_path, monkeypatch):
    """Finished results are rendered into the named section; the other sections of the file are kept."""
    import bench.report
    import bench.sweep

    spec, results, doc = tmp_path / "spec.json", tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    spec.write_text(json.dumps([{"name": "a", "seeds": [0]}]))
    results.write_text(json.dumps([{"name": "a", "seed": 0, "objective": "nclip", "flops_per_sample": 2.0,
                                    "clusters/image/clusters_used_frac": 0.198}]))
    doc.write_text("# Benchmarks\n\n<!-- sweep:start -->\nthe recipe table\n<!-- sweep:end -->\n")
    monkeypatch.setattr(bench.report, "BENCHMARKS", doc)
    monkeypatch.setattr(sys, "argv", ["sweep.py", "--spec", str(spec), "--results", str(results), "--reference", "a",
                                      "--write-section", "--section", "nclip-prototypes", "--title", "nCLIP sweep"])
    bench.sweep.main()
    text = doc.read_text()
    assert "the recipe table" in text and "## nCLIP sweep" in text
    section = text.split("<!-- nclip-prototypes:start -->")[1].split("<!-- nclip-prototypes:end -->")[0]
    assert "| a | nclip | 1 |" in section and "19.8" in section
    monkeypatch.setattr(sys, "argv", ["sweep.py", "--spec", str(spec), "--results", str(results), "--write-section",
                                      "--section", "../x"])
    with pytest.raises(SystemExit):
        bench.sweep.main()


def test_provenance_quotes_arguments_so_the_command_can_be_pasted_back(monkeypatch):
    from bench.report import provenance

    monkeypatch.setattr(sys, "argv", ["bench/sweep.py", "--title", "xCLIP balancing (val split)"])
    assert "Command: `python bench/sweep.py --title 'xCLIP balancing (val split)'`" in provenance()
