"""Service throughput, latency and CPU cost vs raw ONNX Runtime, side by side in one run, for images and texts.

Measures (1) the raw encoder (preprocess → ONNX run → postprocess on decoded inputs, no HTTP) at the batch sizes
the batcher forms: items/s and this process's CPU seconds per item, with the encoder the server builds (same
settings, same threads); (2) the real server (uvicorn subprocess) driven by `wrk` (bench/wrk_post.lua, one thread,
single-item `POST /v1/embeddings`) over 1 connection and 32 connections: requests/s, p50/p99 latency, the mean
batch the batcher formed (/metrics), the server's CPU seconds per request (/proc/<pid>/stat), wrk's own CPU and
the rest of the machine's. Any non-2xx response or socket error fails the run instead of counting as throughput.
Writes the `service` section of docs/BENCHMARKS.md.

    python bench/service.py --bundle bundles/xclip --data .cache/data/emoji-16.0.0
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import markdown_table, write_section
from core.data import load_samples
from core.onnx_encoder import OnnxEncoder
from service.registry import ModelRegistry
from service.settings import Settings

KEY = "bench-key"
BATCH_SIZES = (1, 8, 16, 32)
CONNECTIONS = (1, 32)
WARMUP_S = 2
WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- CPU clocks ------------------------------------------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle, I/O wait and steal (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished, waited-for children (here: the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass(frozen=True)
class Clocks:
    """Wall time and the CPU clocks a wrk run is charged against."""

    wall: float
    server: float
    wrk: float
    machine: float

    @classmethod
    def now(cls, server_pid: int) -> Clocks:
        return cls(time.perf_counter(), process_cpu_seconds(server_pid), children_cpu_seconds(),
                   machine_busy_seconds())


# -- raw encoder -----------------------------------------------------------------------------------------------------
def server_encoder(bundle: Path, state: Path) -> OnnxEncoder:
    """The encoder the server builds from `bundle`: same settings (XCLIP_* included), same threads, no spinning."""
    settings = Settings(api_keys=json.dumps({KEY: ["admin"]}), state_dir=state)
    return ModelRegistry(settings).load(bundle).encoder


def raw_encoder(encoder: OnnxEncoder, modality: str, items: list, batch: int, seconds: float) -> dict:
    """Items/s, CPU ms per item and cores busy (all threads of this process), and the rest of the machine's
    cores, of preprocess → run → postprocess at one batch size."""
    encode = encoder.encode_images if modality == "image" else encoder.encode_texts
    encode(items[:batch], batch_size=batch)  # warm-up
    done, start, cpu0, busy0 = 0, time.perf_counter(), time.process_time(), machine_busy_seconds()
    while time.perf_counter() - start < seconds:
        offset = (done // batch * batch) % max(len(items) - batch, 1)
        encode(items[offset : offset + batch], batch_size=batch)
        done += batch
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"items_per_s": done / wall, "cpu_ms_per_item": 1000 * cpu / done, "cores": cpu / wall,
            "other_cores": (machine_busy_seconds() - busy0 - cpu) / wall}


# -- the server under wrk --------------------------------------------------------------------------------------------
def start_server(bundle: Path, state: Path, port: int) -> subprocess.Popen:
    """`xclip-serve serve` on loopback as a subprocess (one uvicorn worker), once /readyz answers."""
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


def wrk(url: str, bodies: Path, connections: int, seconds: int) -> dict:
    """One wrk run (one thread) over `connections`; its result line. Raises on any non-2xx or socket error."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(WRK_SCRIPT),
               f"{url}/v1/embeddings", "--", str(bodies), KEY]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    failed = {k: v for k, v in result.items() if k in ("non2xx", "connect_errors", "read_errors", "write_errors",
                                                         "timeouts") and v}
    if failed:
        raise RuntimeError(f"wrk at {connections} connections: {failed} of {result['requests']} requests failed; "
                           f"failures are not throughput, so the run stops here.\n{done.stdout}")
    return result


def batch_totals(url: str, modality: str) -> tuple[float, float]:
    """(count, sum) of the batch-size histogram for `modality` from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'xclip_batch_size_{part}{{modality="{modality}"}}'):
                values[part] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def measured_run(url: str, server_pid: int, modality: str, bodies: Path, connections: int, seconds: int) -> dict:
    """A warm-up, then one wrk run with the server's, wrk's and the machine's CPU over it and the mean batch."""
    wrk(url, bodies, connections, WARMUP_S)
    count0, sum0 = batch_totals(url, modality)
    before = Clocks.now(server_pid)
    result = wrk(url, bodies, connections, seconds)
    after = Clocks.now(server_pid)
    count1, sum1 = batch_totals(url, modality)
    wall, requests = after.wall - before.wall, result["requests"]
    server, wrk_cpu = after.server - before.server, after.wrk - before.wrk
    return {"requests_per_s": requests / (result["duration_us"] / 1e6),
            "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
            "mean_batch": (sum1 - sum0) / max(count1 - count0, 1),
            "server_cpu_ms_per_request": 1000 * server / requests, "server_cores": server / wall,
            "wrk_cores": wrk_cpu / wall, "other_cores": (after.machine - before.machine - server - wrk_cpu) / wall}


def write_bodies(samples, modality: str, path: Path) -> Path:
    """One single-item `/v1/embeddings` JSON body per line (base64 PNG for images), as wrk_post.lua reads them."""
    if modality == "image":
        bodies = [{"input": [base64.b64encode(_png(s)).decode()], "model": "active", "modality": "image"}
                  for s in samples]
    else:
        bodies = [{"input": [s.texts[0]], "model": "active"} for s in samples]
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    return path


def _png(sample) -> bytes:
    buf = io.BytesIO()
    sample.image.save(buf, "PNG")
    return buf.getvalue()


# -- the tables ------------------------------------------------------------------------------------------------------
def interpolated(values: dict[int, float], batch: float) -> float:
    """A per-batch-size measurement interpolated at the (mean) batch size the batcher formed."""
    sizes = sorted(values)
    lo = max([b for b in sizes if b <= batch], default=sizes[0])
    hi = min([b for b in sizes if b >= batch], default=sizes[-1])
    if hi == lo:
        return values[lo]
    return values[lo] + (values[hi] - values[lo]) * (batch - lo) / (hi - lo)


def summary(modality: str, raw: dict[int, dict], service: dict[int, dict], bodies: int) -> dict:
    """One modality's measurements and the ratios between them."""
    serial, loaded = service[1], service[32]
    raw_rate = {b: r["items_per_s"] for b, r in raw.items()}
    raw_cpu = {b: r["cpu_ms_per_item"] for b, r in raw.items()}
    return {"modality": modality, "bodies": bodies, "raw": raw, "serial": serial, "loaded": loaded,
            "vs_raw_at_batch": loaded["requests_per_s"] / interpolated(raw_rate, loaded["mean_batch"]),
            "vs_raw_32": loaded["requests_per_s"] / raw_rate[32],
            "loaded_vs_serial": loaded["requests_per_s"] / serial["requests_per_s"],
            "encoder_ms": interpolated(raw_cpu, loaded["mean_batch"])}


def throughput_table(rows: list[dict]) -> str:
    headers = ["modality", "raw ORT items/s (batch 1 / 8 / 16 / 32)", "service req/s (serial / 32 conn)",
               "mean batch (32 conn)", "service ÷ raw (at mean batch / at batch 32)", "32 conn ÷ serial",
               "p50 / p99 ms (serial)", "p50 / p99 ms (32 conn)"]
    return markdown_table(headers, [[
        r["modality"], " / ".join(f"{r['raw'][b]['items_per_s']:.0f}" for b in BATCH_SIZES),
        f"{r['serial']['requests_per_s']:.0f} / {r['loaded']['requests_per_s']:.0f}",
        f"{r['loaded']['mean_batch']:.1f}", f"{r['vs_raw_at_batch']:.2f} / {r['vs_raw_32']:.2f}",
        f"{r['loaded_vs_serial']:.1f}×", f"{r['serial']['p50_ms']:.1f} / {r['serial']['p99_ms']:.1f}",
        f"{r['loaded']['p50_ms']:.1f} / {r['loaded']['p99_ms']:.1f}"] for r in rows])


def cpu_table(rows: list[dict]) -> str:
    headers = ["modality", "encoder CPU ms/item (batch 1 / 32)", "server CPU ms/request (serial / 32 conn)",
               "server − encoder at mean batch, ms/request", "encoder ÷ server CPU (32 conn)",
               "cores busy: raw batch 32 / server / wrk (32 conn)", "other processes, cores (raw batch 32 / 32 conn)"]
    return markdown_table(headers, [[
        r["modality"], f"{r['raw'][1]['cpu_ms_per_item']:.2f} / {r['raw'][32]['cpu_ms_per_item']:.2f}",
        f"{r['serial']['server_cpu_ms_per_request']:.2f} / {r['loaded']['server_cpu_ms_per_request']:.2f}",
        f"{r['loaded']['server_cpu_ms_per_request'] - r['encoder_ms']:.2f}",
        f"{r['encoder_ms'] / r['loaded']['server_cpu_ms_per_request']:.2f}",
        f"{r['raw'][32]['cores']:.2f} / {r['loaded']['server_cores']:.2f} / {r['loaded']['wrk_cores']:.2f}",
        f"{r['raw'][32]['other_cores']:.2f} / {r['loaded']['other_cores']:.2f}"] for r in rows])


def tables(rows: list[dict]) -> str:
    return f"{throughput_table(rows)}\n\n{cpu_table(rows)}"


def notes(seconds: int, bodies: int) -> str:
    return (f"One `uvicorn` worker; single-item `POST /v1/embeddings` requests (base64 PNG for images; {bodies} "
            f"test-split bodies round-robin) from `wrk` (one thread, `bench/wrk_post.lua`) over 1 and over 32 "
            f"keep-alive connections, {seconds} s per run after a {WARMUP_S} s warm-up; a non-2xx response fails "
            "the run. Raw = the server's `OnnxEncoder` (same settings and threads) preprocess → run → postprocess "
            "on decoded inputs in this process, no HTTP; its CPU is `time.process_time()` (all threads) per item. "
            "Server CPU is the server process's utime + stime (/proc/<pid>/stat) over a run ÷ the requests "
            "answered; `server − encoder` is what a request costs beyond the encoder (HTTP, auth, JSON, base64 + "
            "PNG decode, batching), with the encoder's CPU interpolated at the mean batch, and `encoder ÷ server "
            "CPU` is the service ÷ raw throughput the server would reach if it kept as many cores busy as the raw "
            "encoder does. Cores busy = CPU seconds per wall second; `other processes` is the rest of the machine's "
            "CPU over the same run (/proc/stat): well above zero, the req/s and items/s columns were measured on "
            "fewer than all the cores.")


# -- main ------------------------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    samples = load_samples(args.data, split="test")[0][:256]
    inputs = {"image": [s.image for s in samples], "text": [s.texts[0] for s in samples]}
    encoder = server_encoder(args.bundle, tmp / "raw-state")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    rows = []
    server = start_server(args.bundle, tmp / "state", port)
    try:
        for modality in ("image", "text"):
            raw = {b: raw_encoder(encoder, modality, inputs[modality], b, args.seconds / 2) for b in BATCH_SIZES}
            bodies = write_bodies(samples, modality, tmp / f"{modality}.jsonl")
            service = {c: measured_run(url, server.pid, modality, bodies, c, args.seconds) for c in CONNECTIONS}
            rows.append(summary(modality, raw, service, len(samples)))
            print(tables(rows), flush=True)
    finally:
        server.terminate()
        server.wait(20)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/xclip"))
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (raw: half per batch size)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: `make bench-service` installs it (Debian/Ubuntu: apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    if not args.no_write:
        write_section("service", "Service vs raw ONNX Runtime (dynamic batching)",
                      f"{tables(rows)}\n\n{notes(args.seconds, rows[0]['bodies'])}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
