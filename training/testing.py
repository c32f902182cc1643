"""Test support shared by every package's tests: a tiny synthetic data set (coloured shapes) and a tiny bundle
trained and exported by the real training code in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "orange": (250, 150, 0)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: tuple[int, int, int], shape: str, size: int, offset: int) -> Image.Image:
    """An RGBA icon: one shape on a transparent background."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    lo, hi = 4 + offset, size - 4 - (3 - offset)
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=colour)
    return image


def make_shapes_dataset(root: Path, variants: int = 4, size: int = 24) -> Path:
    """4 colours × 3 shapes × `variants` images; split by (colour, shape) group; labels colour and shape."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for g, (colour, rgb) in enumerate(COLOURS.items()):
        for s, shape in enumerate(SHAPES):
            group = f"{colour}-{shape}"
            split = "test" if (g + s) % 4 == 3 else "val" if (g + s) % 4 == 2 else "train"
            for v in range(variants):
                path = f"images/{group}-{v}.png"
                draw_shape(rgb, shape, size, v).save(root / path)
                texts = [f"{colour} {shape}", f"a {shape} that is {colour}", f"{colour} {shape}, a {shape} icon"]
                rows.append({"image": path, "text": texts, "labels": {"colour": colour, "shape": shape},
                             "split": split, "group": group})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_run(data: Path, out: Path, objective: str, **overrides) -> Path:
    """A tiny model trained for a few steps on `data`; returns its run directory."""
    from training.trainer import TrainConfig, train

    train(TrainConfig(data=str(data), output=str(out), objective=objective, batch_size=8, progress=False,
                      **{"model": "tiny", "epochs": 1, "max_steps": 2, **overrides}))
    return out


def export_run(run: Path, data: Path, out: Path, **kwargs) -> Path:
    """The CLI's export path: parity on real held-out samples of `data`."""
    from training import export

    texts, images = export.real_parity_inputs(run, str(data))
    return export.export_bundle(run, out, texts, images, **kwargs)


def make_tiny_bundle(root: Path, objective: str = "xclip", data: Path | None = None, seed: int = 0,
                     **train_overrides) -> Path:
    """Train (a few steps) and export a `tiny` bundle under `root`; returns the bundle directory.

    Different seeds give different weights, hence different model ids (for hot-swap tests)."""
    root.mkdir(parents=True, exist_ok=True)
    data = data or make_shapes_dataset(root / "shapes")
    run = train_run(data, root / f"run-{objective}-{seed}", objective, seed=seed, **train_overrides)
    return export_run(run, data, root / f"bundle-{objective}-{seed}")
