"""The GPU path, measured on a GPU machine: `base` (ViT-B/16 + 12-layer text) trained for a few hundred steps with
torchrun (nccl, bf16 autocast), exported through the parity gate, then image/text embeddings per second through
torch CUDA (fp32, bf16) and ONNX Runtime (its best provider there), and FAISS GPU vs CPU search when faiss-gpu is
installed. Prints one table, writes `gpu.json` + `gpu.md` to --out; `--write-section gpu.json` (run anywhere)
puts them into docs/BENCHMARKS.md.

    bash bench/gpu.sh                     # on the GPU machine (data set from `xclip-serve data emoji`)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

BATCH = 256


def environment() -> dict:
    """GPU, torch, ONNX Runtime providers and FAISS GPU count of this machine."""
    import onnxruntime as ort
    import torch

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpus": torch.cuda.device_count(), "onnxruntime": ort.__version__,
           "ort_providers": ort.get_available_providers()}
    try:
        import faiss

        env["faiss"], env["faiss_gpus"] = faiss.__version__, faiss.get_num_gpus()
    except (ImportError, AttributeError):
        env["faiss"], env["faiss_gpus"] = None, 0
    return env


def train(data: str, run: Path, steps: int, gpus: int, model: str) -> dict:
    """torchrun training of `model` (bf16 on GPUs); the run's metrics.json summary."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(gpus, 1)}", "-m", "xclip_serve.cli", "train",
               "--data", data, "--output", str(run), "--model", model, "--objective", "xclip",
               "--precision", "bf16" if gpus else "fp32", "--batch-size", str(BATCH), "--epochs", "100", "--max-steps", str(steps),
               "--eval-every", "0", "--no-resume"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    summary = json.loads((run / "metrics.json").read_text())
    return {"wall_s": time.perf_counter() - start, **{k: summary.get(k) for k in (
        "samples_per_second", "mfu", "matmul_peak_flops", "world_size", "train_seconds")}}


def export(run: Path, bundle: Path, data: str) -> dict:
    subprocess.run([sys.executable, "-m", "xclip_serve.cli", "export", "--run", str(run), "--output", str(bundle),
                    "--data", data, "--overwrite"], check=True)
    return json.loads((bundle / "config.json").read_text())["parity"]


def timed(fn, repeats: int = 10) -> float:
    """Seconds per call after two warm-ups."""
    fn(), fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def torch_throughput(bundle: Path) -> dict:
    """Items/s of the served encoders in torch (CUDA when present), fp32 and bf16 autocast, batch BATCH."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    from training.encoders import torch_encoder_from_bundle

    encoder = torch_encoder_from_bundle(bundle)
    inputs = _inputs(encoder.preprocess.image_size, encoder.tokenizer)
    results = {}
    for modality, tower in encoder.towers.items():
        tower = tower.to(device)
        x = torch.from_numpy(inputs[modality]).to(device)
        for precision in ("fp32", "bf16") if device == "cuda" else ("fp32",):
            def step(tower=tower, x=x, precision=precision):
                with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
                    tower(x)
                if device == "cuda":
                    torch.cuda.synchronize()
            results[f"torch-{device}-{precision}/{modality}"] = BATCH / timed(step, 3 if device == "cpu" else 10)
    return results


def ort_throughput(bundle: Path) -> dict:
    """Items/s through ONNX Runtime with the best provider available, batch BATCH."""
    from core.bundle import load_bundle
    from core.onnx_encoder import OnnxEncoder

    encoder = OnnxEncoder(load_bundle(bundle))
    provider = encoder.sessions["image"].get_providers()[0].replace("ExecutionProvider", "")
    inputs = _inputs(encoder.bundle.preprocess.image_size, encoder.bundle.tokenizer)
    return {f"ort-{provider}/{m}": BATCH / timed(lambda m=m: encoder.run(m, inputs[m]), 5)
            for m in ("image", "text")}


def _inputs(image_size: int, tokenizer) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    texts = [f"a picture of emoji number {i}" for i in range(BATCH)]
    return {"image": rng.standard_normal((BATCH, 3, image_size, image_size)).astype(np.float32),
            "text": tokenizer.encode(texts)}


def faiss_search(n: int = 1_000_000, dim: int = 512, queries: int = 10_000, k: int = 10) -> dict:
    """Exact (Flat) search queries/s on GPU vs CPU, when faiss-gpu is installed."""
    try:
        import faiss
    except ImportError:
        return {"faiss": "not installed"}
    if faiss.get_num_gpus() == 0:
        return {"faiss": "no GPU build/GPU"}
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    cpu_queries = q[:1000]  # the CPU is ~100× slower: fewer queries keep the run short
    return {"faiss-cpu-flat-qps (1M×512)": len(cpu_queries) / timed(lambda: cpu.search(cpu_queries, k), 2),
            "faiss-gpu-flat-qps (1M×512)": queries / timed(lambda: gpu.search(q, k), 3)}


def markdown(result: dict) -> str:
    env, tr = result["environment"], result["train"]
    lines = [(f"GPU: {env['gpu']} ×{env['gpus']}; torch {env['torch']}; onnxruntime {env['onnxruntime']} "
             f"(providers {', '.join(env['ort_providers'])}); faiss {env['faiss']} ({env['faiss_gpus']} GPUs)"), "",
             "| measurement | value |", "|---|---|",
             (f"| xCLIP training ({result.get('model', 'base')}), global batch {BATCH} (torchrun) | "
             f"{tr['samples_per_second']:.0f} samples/s, MFU {tr['mfu']:.1%} |"),
             (f"| parity ONNX vs torch (max abs diff image / text) | "
             f"{_worst(result['parity']['image']):.1e} / {_worst(result['parity']['text']):.1e} |")]
    lines += [f"| {name} embeddings/s (batch {BATCH}) | {value:.0f} |" for name, value in result["throughput"].items()]
    lines += [f"| {name} | {value if isinstance(value, str) else f'{value:.0f}'} |"
              for name, value in result["faiss"].items()]
    return "\n".join(lines)


def _worst(parity: dict) -> float:
    return max(v for k, v in parity.items() if k.endswith("_vs_torch"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="base", help="architecture config (tiny: a CPU smoke run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-bench")))
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-bench"))
    parser.add_argument("--write-section", type=Path, help="gpu.json of a GPU run: write docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.write_section:
        from bench.report import write_section

        write_section("gpu", "GPU path: training, ONNX Runtime vs torch, FAISS",
                      markdown(json.loads(args.write_section.read_text())))
        return
    env = environment()
    result = {"environment": env, "model": args.model}
    result["train"] = train(args.data, args.work / "run", args.steps, env["gpus"], args.model)
    result["parity"] = export(args.work / "run", args.work / "bundle", args.data)
    result["throughput"] = {**torch_throughput(args.work / "bundle"), **ort_throughput(args.work / "bundle")}
    result["faiss"] = faiss_search()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
