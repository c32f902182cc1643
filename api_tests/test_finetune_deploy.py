"""The fine-tuning loop an ML engineer runs, all through the command line: a pretrained checkpoint (a tiny random
CLIP written by transformers) fine-tuned as xCLIP on streamed data, exported, and deployed to a running server,
which swaps to it without a restart and serves its embeddings and cluster distributions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from api_tests.conftest import Server
from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder
from training.random_checkpoints import save_clip


def cli(*args: str, env: dict | None = None) -> str:
    """`xclip-serve ARGS` as a user runs it; its standard output."""
    done = subprocess.run([sys.executable, "-m", "xclip_serve.cli", *args], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_fine_tune_a_checkpoint_on_streamed_data_export_and_deploy(tmp_path, shapes, bundles):
    checkpoint, run, bundle = save_clip(tmp_path / "clip"), tmp_path / "run", tmp_path / "bundle"
    cli("train", "--init", str(checkpoint), "--objective", "xclip", "--data", str(shapes), "--output", str(run),
        "--data-mode", "stream", "--stream-workers", "2", "--batch-size", "8", "--max-steps", "3",
        "--eval-every", "0")
    assert json.loads((run / "metrics.json").read_text())["data_mode"] == "stream"
    cli("export", "--run", str(run), "--output", str(bundle), "--data", str(shapes))
    expected = OnnxEncoder(load_bundle(bundle), providers="cpu").encode_texts(["red circle"])
    server = Server(tmp_path / "state", bundles["xclip"]).start()
    try:
        with server.client("reader-key") as client:
            before = client.get("/v1/models").json()["active"]
        deployed = json.loads(cli("deploy", "--bundle", str(bundle), "--server", server.base_url,
                                  env={**os.environ, "XCLIP_ADMIN_KEY": "admin-key"}))
        with server.client("reader-key") as client:
            active = client.get("/v1/models").json()["active"]
            served = client.post("/v1/embed/text", json={"texts": ["red circle"], "clusters": True}).json()
    finally:
        server.stop()
    assert active == deployed["active"] != before
    np.testing.assert_allclose(served["data"][0]["embedding"], expected["embedding"][0], atol=1e-5)
    assert len(served["data"][0]["clusters"]) == 5  # the new cluster heads', on the pretrained towers
