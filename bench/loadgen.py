"""HTTP load generator, run as its own process so its CPU cost is measured apart from the server's.

`python bench/loadgen.py --url URL --key KEY --payloads FILE --concurrency 32 --seconds 10` posts the JSON bodies
of FILE (a JSON list of {"path": ..., "body": ...}) round-robin from `concurrency` asyncio callers and prints one
JSON object: requests/s, latency percentiles, errors and the generator's own CPU seconds per wall second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path

import httpx
import numpy as np


async def caller(client: httpx.AsyncClient, payloads: list[dict], offset: int, stop_at: float,
                 latencies: list[float], errors: list[int]) -> None:
    """One caller: post payloads back to back until `stop_at`."""
    i = offset
    while time.perf_counter() < stop_at:
        payload = payloads[i % len(payloads)]
        start = time.perf_counter()
        response = await client.post(payload["path"], json=payload["body"])
        if response.status_code == 200:
            latencies.append(time.perf_counter() - start)
        else:
            errors.append(response.status_code)
        i += 1


async def run(url: str, key: str, payloads: list[dict], concurrency: int, seconds: float, warmup: float) -> dict:
    """Warm up, then measure `concurrency` callers for `seconds`."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=60) as client:
        await asyncio.gather(*(caller(client, payloads, i, time.perf_counter() + warmup, [], [])
                               for i in range(concurrency)))
        latencies, errors = [], []
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(caller(client, payloads, i, wall0 + seconds, latencies, errors)
                               for i in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "loadgen_cpu_per_s": cpu / wall}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--payloads", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    args = parser.parse_args()
    payloads = json.loads(Path(args.payloads).read_text())
    print(json.dumps(asyncio.run(run(args.url, args.key, payloads, args.concurrency, args.seconds, args.warmup))))


if __name__ == "__main__":
    main()
