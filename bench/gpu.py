"""The GPU path, measured on a GPU machine: `base` (ViT-B/16 + 12-layer text) trained for a few hundred steps with
torchrun (nccl, bf16 autocast), exported through the parity gate, then image/text embeddings per second through
torch CUDA (fp32, bf16) and ONNX Runtime (CPU provider; CUDA with the fp32 and fp16 encoders, with and without IO
binding, when onnxruntime-gpu is installed), and FAISS GPU vs CPU search when faiss-gpu is installed. Stages
(`--stages train ort faiss`) merge into --work/gpu.json, so a machine that gets its wheels late can run them
apart. Prints one table with same-run ratios, writes `gpu.json` + `gpu.md` to --out; `--write-section gpu.json`
(run anywhere) puts them into docs/BENCHMARKS.md.

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
    """GPU, CPU, torch, ONNX Runtime providers and FAISS GPU count of this machine."""
    import onnxruntime as ort
    import torch

    from bench.report import machine

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpus": torch.cuda.device_count(), "cpu": machine(), "onnxruntime": ort.__version__,
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
    from training.quantize import add_fp16_variant

    # fp16 twins measured on random inputs: the zero-shot part of the report evaluates the train split too,
    # minutes for `base` on the CPU provider that the report uses
    fp16 = add_fp16_variant(bundle, None)
    return {**json.loads((bundle / "config.json").read_text())["parity"], "fp16_cosine": fp16["cosine"]}


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
    """Items/s through ONNX Runtime, batch BATCH: CUDA with the fp32 and fp16 encoders, with and without IO
    binding, when onnxruntime-gpu is installed; the CPU provider always (the figure a CPU box gets). Also the
    provider that the service's "auto" choice actually lands on."""
    import onnxruntime as ort

    from core.bundle import load_bundle
    from core.onnx_encoder import CUDA, OnnxEncoder

    loaded = load_bundle(bundle)
    inputs = _inputs(loaded.preprocess.image_size, loaded.tokenizer)
    results = {"auto-provider": OnnxEncoder(loaded, variant="auto").sessions["image"].get_providers()[0]}
    settings = [("CPU", "cpu", "fp32", False)]
    if CUDA in ort.get_available_providers():
        settings += [("CUDA", "cuda", v, bound) for v in ("fp32", "fp16") for bound in (False, True)]
    for name, providers, variant, bound in settings:
        encoder = OnnxEncoder(loaded, providers=providers, variant=variant, io_binding=bound)
        label = f"ort-{name}-{variant}" + ("-iobinding" if bound else "")
        for m in ("image", "text"):
            results[f"{label}/{m}"] = BATCH / timed(lambda m=m, e=encoder: e.run(m, inputs[m]), 3 if name == "CPU" else 10)
    return results


def _inputs(image_size: int, tokenizer) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    texts = [f"a picture of emoji number {i}" for i in range(BATCH)]
    return {"image": rng.standard_normal((BATCH, 3, image_size, image_size)).astype(np.float32),
            "text": tokenizer.encode(texts)}


def faiss_search(n: int = 1_000_000, dim: int = 512, queries: int = 10_000, k: int = 10) -> dict:
    """Queries/s of exact (Flat) and IVF search on the GPU (through the service's own GpuReplica) vs the CPU,
    and the share of GPU top-1 ids that equal the CPU's, when faiss-gpu is installed."""
    try:
        import faiss
    except ImportError:
        return {"faiss": "not installed"}
    if faiss.get_num_gpus() == 0:
        return {"faiss": "no GPU build/GPU"}
    from index.gpu import GpuReplica

    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(base)
    q = base[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, dim)).astype(np.float32)
    faiss.normalize_L2(q)
    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    ivf = faiss.index_factory(dim, "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(base[:100_000])
    ivf.add(base)
    ivf.nprobe = 32
    results, cpu_queries = {}, q[:1000]  # the CPU is far slower: fewer queries keep the run short
    for name, index, nprobe in (("flat", flat, None), ("ivf1024-nprobe32", ivf, 32)):
        replica = GpuReplica()
        replica.search(index, 0, q[:10], k, nprobe)  # copies the index to the GPU once
        cpu_qps = len(cpu_queries) / timed(lambda i=index: i.search(cpu_queries, k), 2)
        gpu_qps = queries / timed(lambda i=index, r=replica, p=nprobe: r.search(i, 0, q, k, p), 3)
        same = np.mean(replica.search(index, 0, cpu_queries, k, nprobe)[1][:, 0] == index.search(cpu_queries, k)[1][:, 0])
        results[f"faiss {name} 1M×512, CPU q/s"] = cpu_qps
        results[f"faiss {name} 1M×512, GPU q/s (batch {queries})"] = gpu_qps
        results[f"faiss {name}: GPU top-1 = CPU top-1"] = f"{same:.1%}"
    return results


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [(f"GPU: {env['gpu']} ×{env['gpus']}; CPU: {env.get('cpu')}; torch {env['torch']}; "
              f"onnxruntime {env['onnxruntime']} (providers {', '.join(env['ort_providers'])}); "
              f"faiss {env['faiss']} ({env['faiss_gpus']} GPUs)"), "",
             "| measurement | value |", "|---|---|"]
    if tr := result.get("train"):
        lines.append(f"| xCLIP training ({result.get('model', 'base')}), global batch {BATCH} (torchrun, "
                     f"{tr['world_size']} process) | {tr['samples_per_second']:.0f} samples/s, MFU {tr['mfu']:.1%} |")
    if parity := result.get("parity"):
        lines.append(f"| parity ONNX vs torch (max abs diff image / text) | "
                     f"{_worst(parity['image']):.1e} / {_worst(parity['text']):.1e} |")
        if cosine := parity.get("fp16_cosine"):
            lines.append(f"| fp16 ONNX vs fp32, min cosine (image / text) | "
                         f"{cosine['image']['min']:.5f} / {cosine['text']['min']:.5f} |")
    for name, value in {**result.get("throughput", {}), **result.get("ort", {})}.items():
        shown = value if isinstance(value, str) else f"{value:.0f}"
        lines.append(f"| {name} (batch {BATCH}) | {shown} |" if "/" in name else f"| {name} | {shown} |")
    lines += [f"| {name} | {value if isinstance(value, str) else f'{value:.0f}'} |"
              for name, value in result.get("faiss", {}).items()]
    return "\n".join(lines + ratios(result))


def ratios(result: dict) -> list[str]:
    """The comparisons the table is for, as ratios of rows measured in the same run."""
    rows = {**result.get("throughput", {}), **result.get("ort", {}), **result.get("faiss", {})}
    pairs = [(f"ONNX Runtime CUDA fp16 / torch CUDA bf16, {m}", f"ort-CUDA-fp16/{m}", f"torch-cuda-bf16/{m}")
             for m in ("image", "text")]
    pairs += [(f"ONNX Runtime CUDA fp16 / fp32, {m}", f"ort-CUDA-fp16/{m}", f"ort-CUDA-fp32/{m}") for m in ("image", "text")]
    pairs += [(f"ONNX Runtime IO binding / plain run (fp16), {m}", f"ort-CUDA-fp16-iobinding/{m}", f"ort-CUDA-fp16/{m}")
              for m in ("image", "text")]
    pairs += [(f"ONNX Runtime CUDA fp16 / CPU provider (same machine), {m}", f"ort-CUDA-fp16/{m}", f"ort-CPU-fp32/{m}")
              for m in ("image", "text")]
    for family in ("flat", "ivf1024-nprobe32"):
        gpu = next((k for k in rows if k.startswith(f"faiss {family} ") and "GPU q/s" in k), None)
        pairs.append((f"FAISS {family}: GPU / CPU queries per second", gpu, f"faiss {family} 1M×512, CPU q/s"))
    found = [(label, rows[a] / rows[b]) for label, a, b in pairs
             if isinstance(rows.get(a), float) and isinstance(rows.get(b), float)]
    if not found:
        return []
    return ["", "| ratio (same run) | × |", "|---|---|", *(f"| {label} | {value:.2f} |" for label, value in found), "",
            NOTE]


NOTE = ("torch rows time the towers on a batch already on the GPU; ONNX Runtime rows take host numpy in and out, "
        "as the service does, so they include copying the batch to the GPU and the outputs back.")


def _worst(parity: dict) -> float:
    return max(v for k, v in parity.items() if k.endswith("_vs_torch"))


STAGES = ("train", "ort", "faiss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="base", help="architecture config (tiny: a CPU smoke run)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="train: torchrun training, export (+fp16), torch throughput; ort: ONNX Runtime "
                             "throughput; faiss: GPU vs CPU search. Results merge into --work/gpu.json.")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-bench")))
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-bench"))
    parser.add_argument("--write-section", type=Path, help="gpu.json of a GPU run: write docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.write_section:
        from bench.report import write_section

        result = json.loads(args.write_section.read_text())
        write_section("gpu", "GPU path: training, ONNX Runtime vs torch, FAISS", markdown(result),
                      command="bash bench/gpu.sh", where=f"{result['environment']['gpu']}, "
                      f"{result['environment']['cpu']}", date=result.get("date"))
        return
    state = args.work / "gpu.json"
    result = json.loads(state.read_text()) if state.is_file() else {}
    result.update(environment=environment(), model=args.model, date=time.strftime("%Y-%m-%d"))
    if "train" in args.stages:
        result["train"] = train(args.data, args.work / "run", args.steps, result["environment"]["gpus"], args.model)
        result["parity"] = export(args.work / "run", args.work / "bundle", args.data)
        result["throughput"] = torch_throughput(args.work / "bundle")
    if "ort" in args.stages:
        result["ort"] = ort_throughput(args.work / "bundle")
    if "faiss" in args.stages:
        result["faiss"] = faiss_search()
    for folder in {args.work, args.out}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu.json").write_text(json.dumps(result, indent=1))
        (folder / "gpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
