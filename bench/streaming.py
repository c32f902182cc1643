"""Streamed vs cached training batches on a synthetic WebDataset shard set of JPEGs far larger than a small cache
budget: samples/s and peak RSS of streaming (`StreamingBatches`, 0 and 2 DataLoader workers) and of the in-memory
cache (`build_cache` + `BatchSampler`, on a subset: the whole set would not fit), each measured in its own
subprocess. Prints a table; it writes no docs.

    python bench/streaming.py            # 3,000 images of 224 px in 12 shards: about a minute on 2 cores
    python bench/streaming.py --samples 20000 --shards 40 --steps 30 --budget-mb 256
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw

from bench.report import markdown_table, write_section

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 190), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "bar")
MODES = ("imports", "stream-0w", "stream-2w", "cache")


def synthetic_pair(index: int, size: int) -> tuple[bytes, str]:
    """A JPEG (a shape on a gradient: photo-like bytes, ~10 KB at 224 px) and its caption."""
    rng = np.random.default_rng(index)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    base = rng.uniform(60, 200, 3)
    background = base + 50 * (ramp[:, None, None] - 0.5) + 30 * (ramp[None, :, None] - 0.5)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    lo, hi = sorted(rng.integers(size // 8, size - size // 8, 2))
    box = (lo, lo, hi, hi) if shape != "bar" else (lo, size // 3, hi, 2 * size // 3)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    tone = "light" if base.mean() > 130 else "dark"
    return out.getvalue(), f"a {colour} {shape} on a {tone} background"


def write_shards(root: Path, samples: int, shards: int, size: int) -> str:
    """`shards` tar files of ~samples/shards pairs (KEY.jpg, KEY.txt); returns their brace pattern."""
    for shard in range(shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for index in range(samples * shard // shards, samples * (shard + 1) // shards):
                jpeg, caption = synthetic_pair(index, size)
                for suffix, payload in (("jpg", jpeg), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident memory in MB (ru_maxrss is in KB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, child / 1024


def measure(mode: str, args) -> dict:
    """One mode's reading rate and peak memory, in this (fresh) process."""
    if mode == "imports":
        import training.streaming  # noqa: F401  (what every mode pays before reading a byte)

        return {}
    from core.preprocess import PreprocessConfig
    from core.tokenizer import TextTokenizer
    from training.batches import AugmentConfig

    preprocess = PreprocessConfig(image_size=args.image_size)
    tokenizer = TextTokenizer.from_file(args.work / "tokenizer.json")
    if mode == "cache":
        return measure_cache(args, preprocess, tokenizer, AugmentConfig())
    return measure_stream(args, preprocess, tokenizer, AugmentConfig(), workers=int(mode[len("stream-")]))


def measure_stream(args, preprocess, tokenizer, augment, workers: int) -> dict:
    from training.streaming import StreamConfig, StreamingBatches

    start = time.perf_counter()
    sampler = StreamingBatches(args.pattern, preprocess, tokenizer, args.batch, 0, augment,
                               config=StreamConfig(workers=workers))
    counted = time.perf_counter()
    sampler.batch(0)
    first = time.perf_counter()
    for step in range(1, args.steps):
        sampler.batch(step)
    done = time.perf_counter()
    sampler.close()
    gc.collect()  # the DataLoader's workers are joined: their peak counts among the children
    return {"setup_s": counted - start, "first_batch_s": first - counted, "samples": args.batch * args.steps,
            "rate": args.batch * (args.steps - 1) / (done - first), "held_mb": 0.0}


def measure_cache(args, preprocess, tokenizer, augment) -> dict:
    from core.data import iter_samples
    from training.batches import BatchSampler, build_cache

    start = time.perf_counter()
    cache = build_cache(islice(iter_samples(args.pattern), args.cache_subset), preprocess, tokenizer,
                        progress=False)
    built = time.perf_counter()
    sampler = BatchSampler(cache, args.batch, 0, augment)
    sampler.batch(0)
    first = time.perf_counter()
    for step in range(1, args.steps):
        sampler.batch(step)
    done = time.perf_counter()
    return {"setup_s": built - start, "first_batch_s": first - built, "samples": len(cache),
            "build_rate": len(cache) / (built - start), "rate": args.batch * (args.steps - 1) / (done - first),
            "held_mb": cache.pixels.numel() * cache.pixels.element_size() / 1e6}


def run_measurement(mode: str, args) -> dict:
    """`measure(mode)` in a fresh interpreter, so that each peak RSS is that mode's alone."""
    command = [sys.executable, __file__, "--measure", mode, "--work", str(args.work), "--pattern", args.pattern,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--cache-subset", str(args.cache_subset)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict], args) -> str:
    rows = []
    for mode, r in results.items():
        if mode == "imports":
            rows.append([mode, "", "", "", "", f"{r['rss_mb']:.0f}", "", ""])
            continue
        rate = f"{r['rate']:.0f}" + (f" (build {r['build_rate']:.0f})" if "build_rate" in r else "")
        worker = f"{r['child_rss_mb']:.0f}" if mode == "stream-2w" else ""
        rows.append([mode, str(r["samples"]), f"{r['setup_s']:.1f}", f"{r['first_batch_s']:.2f}", rate,
                     f"{r['rss_mb']:.0f}", worker, f"{r['held_mb']:.0f}"])
    headers = ["path", "samples read", "setup s", "first batch s", "samples/s", "peak RSS MB", "worker peak MB",
               "pixels held MB"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="images in the synthetic shard set")
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224, help="JPEG side and model input size")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=12, help="batches read per mode (the first is timed apart)")
    parser.add_argument("--cache-subset", type=int, default=512, help="samples the cache path holds")
    parser.add_argument("--budget-mb", type=float, default=64.0, help="memory budget of choose_data_mode")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/BENCHMARKS.md alone.")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(args.measure, args)
        own, child = peak_rss_mb()
        print(json.dumps({**result, "rss_mb": own, "child_rss_mb": child}))
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = Path(work)
        report(args)


def report(args) -> None:
    from core.tokenizer import train_tokenizer
    from training.streaming import cache_bytes, choose_data_mode

    start = time.perf_counter()
    args.pattern = write_shards(args.work, args.samples, args.shards, args.image_size)
    written = time.perf_counter() - start
    captions = [synthetic_pair(i, 8)[1] for i in range(200)]
    train_tokenizer(captions, 512, 32).save(args.work / "tokenizer.json")
    shard_mb = sum(p.stat().st_size for p in args.work.glob("*.tar")) / 1e6
    full_cache_mb = cache_bytes(args.samples, args.image_size) / 1e6
    mode = choose_data_mode(args.samples, args.image_size, int(args.budget_mb * 1e6))
    print(f"{args.samples} JPEGs of {args.image_size} px in {args.shards} shards: {shard_mb:.0f} MB, written in "
          f"{written:.0f} s; the cache of all of them would hold {full_cache_mb:.0f} MB of pixels: "
          f"choose_data_mode(budget {args.budget_mb:.0f} MB) = {mode!r}")
    results = {m: run_measurement(m, args) for m in MODES}
    setting = (f"{args.samples} JPEGs of {args.image_size} px in {args.shards} WebDataset shards ({shard_mb:.0f} MB; "
               f"caching all of them would hold {full_cache_mb:.0f} MB of pixels, so `choose_data_mode` with a "
               f"{args.budget_mb:.0f} MB budget picks {mode!r}); batch {args.batch}, {args.steps} batches per path, "
               "random resized crops on; each path in its own process (peak RSS from `ru_maxrss`).")
    body = f"{setting}\n\n{table(results, args)}\n"
    print(body)
    if not args.no_write:
        write_section("streaming", "Training data: streamed vs cached (CPU)", body)
    print("samples/s: after the first batch; cache: its batches, and (build) its decode + resize pass. "
          "setup: counting the shards (stream) or building the cache. Peak RSS: each path's own process; "
          "worker peak: the largest DataLoader worker.")


if __name__ == "__main__":
    main()
