"""Export a training run to a model bundle: ONNX encoders gated on parity with torch, weights, tokenizer,
preprocessing, label sets, config and a SHA-256 manifest. A bundle that fails parity is never written."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file, save_file

from core import __version__
from core.bundle import BundleConfig, OnnxFiles, load_bundle
from core.manifest import write_manifest
from core.metrics import DEFAULT_TEMPLATES
from core.preprocess import PreprocessConfig
from core.tokenizer import TextTokenizer, trim_to_longest
from training.encoders import ServedEncoder, output_names
from training.losses import NClipConfig
from training.model import DualEncoder, create_model
from training.optim import latest_checkpoint

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17
INPUT_NAMES = {"image": "pixel_values", "text": "input_ids"}


class ExportParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the tolerance; the bundle is not written."""


def load_run(run_dir: Path) -> tuple[DualEncoder, dict, TextTokenizer, PreprocessConfig]:
    """The trained model of a run directory (its latest checkpoint) with the run's tokenizer and preprocessing."""
    meta = json.loads((run_dir / "train_config.json").read_text())
    tokenizer = TextTokenizer.from_file(run_dir / "tokenizer.json")
    model = create_model(meta["model"], eos_id=tokenizer.eos_id,
                         cluster_temp=NClipConfig(**meta["train"].get("nclip", {})).student_temp)
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint; train first")
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return model.eval(), meta, tokenizer, PreprocessConfig.load(run_dir / "preprocess.json")


def export_onnx(encoder: ServedEncoder, example: torch.Tensor, path: Path, names: list[str]) -> None:
    """TorchScript-based exporter with a dynamic batch axis (the dynamo exporter renames our outputs)."""
    input_name = INPUT_NAMES[encoder.modality]
    axes = {name: {0: "batch"} for name in [input_name, *names]}
    if encoder.modality == "text":  # any length: a batch may be cut to its longest text (text_padding_report)
        axes[input_name] = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), str(path), input_names=[input_name], output_names=names,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


def parity_inputs(modality: str, tokenizer: TextTokenizer, preprocess: PreprocessConfig, texts: list[str],
                  images: np.ndarray | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random and real inputs for the parity check."""
    rng = np.random.default_rng(seed)
    if modality == "image":
        size = preprocess.image_size
        rand = rng.standard_normal((8, 3, size, size)).astype(np.float32)
        return {"random": rand, **({"real": images} if images is not None and len(images) else {})}
    rand_ids = rng.integers(3, tokenizer.vocab_size, (8, tokenizer.context_length))
    rand_ids[:, rng.integers(1, tokenizer.context_length, 8)] = tokenizer.eos_id
    return {"random": rand_ids.astype(np.int64), "real": tokenizer.encode(texts)}


def check_parity(encoder: ServedEncoder, onnx_path: Path, inputs: dict[str, np.ndarray], names: list[str]) -> dict:
    """Max abs difference ORT vs torch on each input set, and ORT batched vs one-by-one."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = INPUT_NAMES[encoder.modality]
    report = {}
    for kind, x in inputs.items():
        with torch.no_grad():
            expected = [t.numpy() for t in encoder(torch.from_numpy(x))]
        batched = session.run(names, {input_name: x})
        singles = [np.concatenate(parts) for parts in zip(*(session.run(names, {input_name: x[i:i + 1]})
                                                            for i in range(len(x))))]
        report[f"{kind}_vs_torch"] = max(float(np.abs(a - b).max()) for a, b in zip(batched, expected))
        report[f"{kind}_batched_vs_single"] = max(float(np.abs(a - b).max()) for a, b in zip(batched, singles))
    worst = max(report.values())
    report["passed"] = worst <= PARITY_TOLERANCE
    if not report["passed"]:
        raise ExportParityError(f"{encoder.modality} encoder: ONNX differs from torch by {worst:.2e} "
                                f"(> {PARITY_TOLERANCE:.0e}): {report}")
    return report


def text_padding_report(encoder, onnx_path: Path, ids: np.ndarray, end_id: int) -> dict:
    """Whether the text encoder may take a batch cut to its longest text: ONNX Runtime on the ids trimmed
    together (`trim_to_longest`) and on each row trimmed alone, against torch on the full-length ids; `passed`
    decides the bundle's `text_padding` ("longest" when within PARITY_TOLERANCE, else "fixed")."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = INPUT_NAMES["text"]
    with torch.no_grad():
        expected = encoder(torch.from_numpy(ids))[0].numpy()
    try:
        together = session.run(None, {name: trim_to_longest(ids, end_id)})[0]
        alone = np.concatenate([session.run(None, {name: trim_to_longest(ids[i:i + 1], end_id)})[0]
                                for i in range(len(ids))])
    except Exception as err:  # a graph whose sequence length is fixed: ORT refuses other lengths  # noqa: BLE001
        return {"passed": False, "error": str(err).splitlines()[0][:200]}
    report = {"trimmed_vs_full": float(np.abs(together - expected).max()),
              "each_trimmed_vs_full": float(np.abs(alone - expected).max())}
    report["passed"] = max(report.values()) <= PARITY_TOLERANCE
    return report


def bundle_config(model: DualEncoder, meta: dict, metrics: dict, parity: dict) -> BundleConfig:
    """config.json: everything a reader needs, so nothing is re-typed in index/ or service/."""
    cfg = model.config
    nclip = NClipConfig(**meta["train"].get("nclip", {}))
    scale = float(model.logit_scale.detach().exp()) if cfg.objective != "nclip" else 1.0 / nclip.student_temp
    return BundleConfig(
        model_name=f"{cfg.name}-{cfg.objective}", objective=cfg.objective, embed_dim=cfg.retrieval_dim,
        num_clusters=cfg.cluster_head.num_clusters if cfg.has_clusters else 0, logit_scale=scale,
        onnx=OnnxFiles(inputs=INPUT_NAMES, outputs=tuple(output_names(model)), opset=ONNX_OPSET,
                       text_padding="longest" if parity["text"]["padding"]["passed"] else "fixed"),
        cluster_temperature=nclip.student_temp if cfg.has_clusters else None,
        templates=tuple(meta["train"].get("templates") or DEFAULT_TEMPLATES), architecture=cfg.to_dict(),
        extra={"version": __version__, "data_fingerprint": meta.get("data_fingerprint"), "metrics": metrics,
               "training": meta["train"], "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "parity": parity},
    )


def export_bundle(run_dir: Path, out_dir: Path, parity_texts: list[str] | None = None,
                  parity_images: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write the bundle to `out_dir` atomically; raises ExportParityError (and writes nothing) on a mismatch."""
    model, meta, tokenizer, preprocess = load_run(run_dir)

    def fill(tmp: Path) -> None:
        report = _write_onnx(model, meta, tokenizer, preprocess, tmp, parity_texts, parity_images)
        _write_files(model, meta, tokenizer, preprocess, run_dir, tmp, report)

    return write_bundle(out_dir, fill, overwrite)


def write_bundle(out_dir: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Have `fill` write a bundle's files into a scratch directory, add the manifest, check that it loads, then
    move it to `out_dir` in one rename; nothing is left at `out_dir` when `fill` or the check raises."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        write_manifest(tmp)
        load_bundle(tmp)  # what we wrote must read back and verify
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("bundle written to %s", out_dir)
    return out_dir


def _write_onnx(model, meta, tokenizer, preprocess, tmp: Path, texts, images) -> dict:
    names = output_names(model)
    texts = texts or [f"a {label} emoji" for labels in meta.get("label_sets", {}).values() for label in labels][:64]
    texts = texts or ["a photo", "an emoji"]
    report = {}
    for modality in ("image", "text"):
        encoder = ServedEncoder(model, modality).eval()
        inputs = parity_inputs(modality, tokenizer, preprocess, texts, images)
        export_onnx(encoder, torch.from_numpy(inputs["random"][:2]), tmp / f"{modality}_encoder.onnx", names)
        report[modality] = check_parity(encoder, tmp / f"{modality}_encoder.onnx", inputs, names)
    report["text"]["padding"] = text_padding_report(ServedEncoder(model, "text").eval(), tmp / "text_encoder.onnx",
                                                    tokenizer.encode(texts), tokenizer.eos_id)
    return report


def _write_files(model, meta, tokenizer, preprocess, run_dir: Path, tmp: Path, report: dict) -> None:
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    config = bundle_config(model, meta, metrics, report)
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    tokenizer.save(tmp / "tokenizer.json")
    preprocess.save(tmp / "preprocess.json")
    (tmp / "label_sets.json").write_text(json.dumps(meta.get("label_sets", {}), indent=1))


def real_parity_inputs(run_dir: Path, data: str | None, limit: int = 32) -> tuple[list[str] | None, np.ndarray | None]:
    """Captions and preprocessed images of real samples (the held-out split when there is one) for parity."""
    if not data:
        return None, None
    from itertools import islice

    from core import data as datasets
    from core.preprocess import preprocess_batch

    present = datasets.splits_present(data)
    split = next((s for s in ("test", "val") if s in present), None)
    samples = list(islice(datasets.iter_samples(data, split=split), limit))
    preprocess = PreprocessConfig.load(run_dir / "preprocess.json")
    return [s.texts[0] for s in samples], preprocess_batch([s.image for s in samples], preprocess)
