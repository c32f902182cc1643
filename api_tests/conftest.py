"""Black-box fixtures: tiny bundles trained and exported in this test session, and the real server started as
a separate process (`xclip-serve serve`, uvicorn) on a random loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from training.testing import make_shapes_dataset, make_tiny_bundle

KEYS = {"reader-key": ["read"], "writer-key": ["write"], "admin-key": ["admin"]}
STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running `xclip-serve serve` process and clients for it."""

    def __init__(self, state_dir: Path, bundle: Path | None, extra_env: dict | None = None):
        self.state_dir, self.bundle, self.extra_env = state_dir, bundle, extra_env or {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = state_dir.parent / f"server-{self.port}.log"

    def start(self) -> Server:
        env = {**os.environ, "XCLIP_API_KEYS": json.dumps(KEYS), "XCLIP_LOG_JSON": "true", **self.extra_env}
        command = [sys.executable, "-m", "xclip_serve.cli", "serve", "--port", str(self.port),
                   "--state-dir", str(self.state_dir)]
        if self.bundle is not None:
            command += ["--bundle", str(self.bundle)]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process's life)
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not up after {STARTUP_TIMEOUT_S}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.log.close()

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def client(self, key: str | None = "admin-key", timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def logs(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """The log once it holds `text`: the access line is written after the response is sent, so a test
        that reads the log right after a response races the server."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.logs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the server log after {timeout}s:\n{logs[-2000:]}")
            time.sleep(0.05)
        return logs


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, shapes) -> dict[str, Path]:
    """Three tiny bundles: xclip (two seeds: two distinct models) and clip (no cluster head)."""
    root = tmp_path_factory.mktemp("bundles")
    return {"xclip": make_tiny_bundle(root, "xclip", shapes, seed=0),
            "xclip-b": make_tiny_bundle(root, "xclip", shapes, seed=1),
            "clip": make_tiny_bundle(root, "clip", shapes, seed=0)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    """A server with the xclip bundle active, shared by a test module."""
    server = Server(tmp_path_factory.mktemp("state") / "state", bundles["xclip"]).start()
    yield server
    server.stop()
