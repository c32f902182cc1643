"""Service throughput and latency vs raw ONNX Runtime, side by side in one run, for images and texts.

Measures (1) raw encoder throughput (preprocess → ONNX run → postprocess, decoded inputs, no HTTP) at the batch
sizes the batcher forms, (2) the real server (uvicorn subprocess) under single-item requests from a load generator
in a separate process: 1 serial caller and 32 concurrent callers, with p50/p99 latency, the mean batch size the
batcher formed (from /metrics) and the load generator's own CPU use. Writes the `service` section of
docs/BENCHMARKS.md.

    python bench/service.py --bundle bundles/xclip --data .cache/data/emoji-16.0.0
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_section
from core.bundle import load_bundle
from core.data import load_samples
from core.onnx_encoder import OnnxEncoder

KEY = "bench-key"
BATCH_SIZES = (1, 8, 16, 32)


def raw_throughput(encoder: OnnxEncoder, modality: str, items: list, batch: int, seconds: float) -> float:
    """Items/s of preprocess → run → postprocess on already-decoded inputs at a fixed batch size."""
    encode = encoder.encode_images if modality == "image" else encoder.encode_texts
    encode(items[:batch], batch_size=batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        offset = (done // batch * batch) % max(len(items) - batch, 1)
        encode(items[offset : offset + batch], batch_size=batch)
        done += batch
    return done / (time.perf_counter() - start)


def start_server(bundle: Path, state: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "XCLIP_API_KEYS": json.dumps({KEY: ["admin"]}), "XCLIP_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "xclip_serve.cli", "serve", "--bundle", str(bundle),
                                "--state-dir", str(state), "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


def load(url: str, payload_file: Path, concurrency: int, seconds: float) -> dict:
    """Run the load generator as a separate process; its JSON result."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("loadgen.py")), "--url", url, "--key", KEY,
                          "--payloads", str(payload_file), "--concurrency", str(concurrency),
                          "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def batch_mean(url: str, modality: str) -> tuple[float, float]:
    """(count, sum) of the batch-size histogram for `modality` from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'xclip_batch_size_{part}{{modality="{modality}"}}'):
                values[part] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def measure_service(url: str, modality: str, payloads: list[dict], seconds: float, tmp: Path) -> dict:
    """Serial (1 caller) and concurrent (32 callers) runs with the mean batch size each formed."""
    payload_file = tmp / f"{modality}.json"
    payload_file.write_text(json.dumps(payloads))
    results = {}
    for concurrency in (1, 32):
        count0, sum0 = batch_mean(url, modality)
        results[concurrency] = load(url, payload_file, concurrency, seconds)
        count1, sum1 = batch_mean(url, modality)
        results[concurrency]["mean_batch"] = (sum1 - sum0) / max(count1 - count0, 1)
    return results


def payloads_for(samples, modality: str, n: int) -> list[dict]:
    if modality == "image":
        bodies = [{"input": [base64.b64encode(_png(s)).decode()], "model": "active", "modality": "image"}
                  for s in samples[:n]]
    else:
        bodies = [{"input": [s.texts[0]], "model": "active"} for s in samples[:n]]
    return [{"path": "/v1/embeddings", "body": b} for b in bodies]


def _png(sample) -> bytes:
    import io

    buf = io.BytesIO()
    sample.image.save(buf, "PNG")
    return buf.getvalue()


def table(rows: list[dict]) -> str:
    header = ("| modality | raw ORT items/s (batch 1 / 8 / 16 / 32) | service serial req/s | service 32 callers "
              "req/s | mean batch | service ÷ raw at that batch | batched ÷ serial | p50 / p99 ms (32 callers) "
              "| p50 / p99 ms (serial) | load-gen CPU (cores) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        raw = " / ".join(f"{r['raw'][b]:.0f}" for b in BATCH_SIZES)
        lines.append(
            f"| {r['modality']} | {raw} "
            f"| {r['serial']['requests_per_s']:.0f} | {r['concurrent']['requests_per_s']:.0f} "
            f"| {r['concurrent']['mean_batch']:.1f} | {r['service_vs_raw']:.2f} | {r['batched_vs_serial']:.1f}× "
            f"| {r['concurrent']['p50_ms']:.1f} / {r['concurrent']['p99_ms']:.1f} "
            f"| {r['serial']['p50_ms']:.1f} / {r['serial']['p99_ms']:.1f} "
            f"| {r['concurrent']['loadgen_cpu_per_s']:.2f} |")
    return "\n".join(lines)


def nearest_raw(raw: dict[int, float], batch: float) -> float:
    """Raw throughput interpolated at the mean batch size the batcher formed."""
    sizes = sorted(raw)
    lo = max([b for b in sizes if b <= batch], default=sizes[0])
    hi = min([b for b in sizes if b >= batch], default=sizes[-1])
    if hi == lo:
        return raw[lo]
    return raw[lo] + (raw[hi] - raw[lo]) * (batch - lo) / (hi - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/xclip"))
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    samples = load_samples(args.data, split="test")[0][:256]
    encoder = OnnxEncoder(load_bundle(args.bundle))
    inputs = {"image": [s.image for s in samples], "text": [s.texts[0] for s in samples]}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.bundle, Path(tmp) / "state", port)
        try:
            for modality in ("image", "text"):
                raw = {b: raw_throughput(encoder, modality, inputs[modality], b, args.seconds / 2)
                       for b in BATCH_SIZES}
                service = measure_service(url, modality, payloads_for(samples, modality, 256), args.seconds,
                                          Path(tmp))
                rows.append(_row(modality, raw, service))
                print(table(rows), flush=True)
        finally:
            server.terminate()
            server.wait(20)
    body = (f"{table(rows)}\n\nOne `uvicorn` worker; single-item `POST /v1/embeddings` requests (base64 PNG for "
            f"images) from `bench/loadgen.py` in its own process, {args.seconds:g} s per run after a 2 s warm-up. "
            "Raw = `OnnxEncoder` preprocess → run → postprocess on decoded inputs in this process, no HTTP. "
            "On 2 cores the load generator, the server's event loop and ONNX Runtime share the CPU: the "
            "load-gen column is what it took away.")
    if not args.no_write:
        write_section("service", "Service vs raw ONNX Runtime (dynamic batching)", body)


def _row(modality: str, raw: dict, service: dict) -> dict:
    concurrent, serial = service[32], service[1]
    return {"modality": modality, "raw": raw, "serial": serial, "concurrent": concurrent,
            "service_vs_raw": concurrent["requests_per_s"] / nearest_raw(raw, concurrent["mean_batch"]),
            "batched_vs_serial": concurrent["requests_per_s"] / serial["requests_per_s"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
