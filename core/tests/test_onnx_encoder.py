"""Tests for the ONNX encoder: tiny hand-built graphs in a fake bundle, compared against numpy references."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from core import onnx_encoder
from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder, ProviderUnavailableError, select_providers
from core.preprocess import preprocess_batch
from core.tests.test_bundle import make_bundle

IMAGE_SIZE, DIM, CLUSTERS, VOCAB = 16, 6, 4, 300
RNG = np.random.default_rng(0)
W_IMAGE = RNG.normal(size=(3 * IMAGE_SIZE * IMAGE_SIZE, DIM)).astype(np.float32)
W_IMAGE_CLUSTERS = RNG.normal(size=(3 * IMAGE_SIZE * IMAGE_SIZE, CLUSTERS)).astype(np.float32) * 0.05
TOKEN_TABLE = RNG.normal(size=(VOCAB, DIM)).astype(np.float32)
W_TEXT_CLUSTERS = RNG.normal(size=(DIM, CLUSTERS)).astype(np.float32)


def serialize(nodes, inputs, outputs, weights) -> bytes:
    """A model at opset 17 from nodes, value infos and {name: array} initialisers."""
    initializers = [numpy_helper.from_array(array, name) for name, array in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cluster_head(features: str, weight: str) -> list:
    """Nodes computing (B, K) cluster_probs = softmax(features @ weight)."""
    return [
        helper.make_node("MatMul", [features, weight], ["cluster_logits"]),
        helper.make_node("Softmax", ["cluster_logits"], ["cluster_probs"], axis=-1),
    ]


def outputs_info(with_clusters: bool) -> list:
    """Value infos of "embedding" (B, D) and optionally "cluster_probs" (B, K)."""
    infos = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", DIM])]
    if with_clusters:
        infos.append(helper.make_tensor_value_info("cluster_probs", TensorProto.FLOAT, ["B", CLUSTERS]))
    return infos


def image_model(with_clusters: bool) -> bytes:
    """embedding = flatten(pixels) @ W_IMAGE, deliberately left unnormalised."""
    nodes = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_image"], ["embedding"]),
    ]
    weights = {"w_image": W_IMAGE}
    if with_clusters:
        nodes += cluster_head("flat", "w_clusters")
        weights["w_clusters"] = W_IMAGE_CLUSTERS
    shape = ["B", 3, IMAGE_SIZE, IMAGE_SIZE]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape)]
    return serialize(nodes, inputs, outputs_info(with_clusters), weights)


def text_model(with_clusters: bool) -> bytes:
    """embedding = mean over positions of TOKEN_TABLE[input_ids]."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["token_emb"], axis=0),
        helper.make_node("ReduceMean", ["token_emb"], ["embedding"], axes=[1], keepdims=0),
    ]
    weights = {"table": TOKEN_TABLE}
    if with_clusters:
        nodes += cluster_head("embedding", "w_clusters")
        weights["w_clusters"] = W_TEXT_CLUSTERS
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"])]
    return serialize(nodes, inputs, outputs_info(with_clusters), weights)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_encoder(tmp_path, with_clusters: bool) -> OnnxEncoder:
    files = {"image_encoder.onnx": image_model(with_clusters), "text_encoder.onnx": text_model(with_clusters)}
    objective, clusters = ("xclip", CLUSTERS) if with_clusters else ("clip", 0)
    bundle_dir = make_bundle(
        tmp_path,
        onnx_files=files,
        objective=objective,
        num_clusters=clusters,
        embed_dim=DIM,
        image_size=IMAGE_SIZE,
    )
    return OnnxEncoder(load_bundle(bundle_dir), providers="cpu", intra_op_threads=1)


@pytest.fixture(scope="module", params=[False, True], ids=["clip", "xclip"])
def encoder(request, tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("bundle"), request.param)


def random_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(16, 16), (23, 11), (9, 30), (40, 40), (16, 17)]
    return [Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 5], 3), dtype=np.uint8)) for i in range(n)]


TEXTS = [
    "grinning face",
    "red apple",
    "a smiling cat with a very long description that is truncated",
    "",
    "Dog",
]


def test_images_match_numpy_reference(encoder):
    images = random_images(5)
    out = encoder.encode_images(images)
    flat = preprocess_batch(images, encoder.bundle.preprocess).reshape(5, -1)
    np.testing.assert_allclose(out["embedding"], unit(flat @ W_IMAGE), atol=1e-5)
    assert out["embedding"].dtype == np.float32
    if encoder.bundle.has_clusters:
        np.testing.assert_allclose(out["cluster_probs"], softmax(flat @ W_IMAGE_CLUSTERS), atol=1e-5)
    else:
        assert set(out) == {"embedding"}


def test_texts_match_numpy_reference(encoder):
    out = encoder.encode_texts(TEXTS)
    pooled = TOKEN_TABLE[encoder.bundle.tokenizer.encode(TEXTS)].mean(axis=1)
    np.testing.assert_allclose(out["embedding"], unit(pooled), atol=1e-5)
    if encoder.bundle.has_clusters:
        np.testing.assert_allclose(out["cluster_probs"], softmax(pooled @ W_TEXT_CLUSTERS), atol=1e-5)


def test_postprocess_renormalises_raw_outputs(encoder):
    raw = encoder.run("image", encoder.preprocess_images(random_images(3)))
    assert not np.allclose(np.linalg.norm(raw["embedding"], axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(encoder.postprocess(raw)["embedding"], axis=1), 1.0, rtol=1e-5)


def test_batched_equals_one_by_one(encoder):
    images = random_images(5)
    batched = encoder.encode_images(images, batch_size=2)
    singles = [encoder.encode_images([im]) for im in images]
    for name, value in batched.items():
        np.testing.assert_allclose(value, np.concatenate([s[name] for s in singles]), atol=1e-5)
    texts = encoder.encode_texts(TEXTS, batch_size=3)
    text_singles = [encoder.encode_texts([t]) for t in TEXTS]
    for name, value in texts.items():
        np.testing.assert_allclose(value, np.concatenate([s[name] for s in text_singles]), atol=1e-5)


def test_empty_inputs_give_zero_rows(encoder):
    for out in (encoder.encode_images([]), encoder.encode_texts([])):
        assert out["embedding"].shape == (0, DIM)
        if encoder.bundle.has_clusters:
            assert out["cluster_probs"].shape == (0, CLUSTERS)


def test_run_rejects_wrong_rank(encoder):
    with pytest.raises(ValueError, match="2-D"):
        encoder.run("text", np.zeros((4,), np.int64))


@pytest.mark.parametrize(
    "available, preferred, expected",
    [
        (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            "auto",
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "auto",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (["AzureExecutionProvider", "CPUExecutionProvider"], "auto", ["CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
        (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            "cuda",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
    ],
)
def test_select_providers(monkeypatch, available, preferred, expected):
    monkeypatch.setattr(onnx_encoder.ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(onnx_encoder, "tensorrt_installed", lambda: True)
    assert select_providers(preferred) == expected


def test_auto_skips_the_tensorrt_provider_when_tensorrt_is_not_installed(monkeypatch):
    """onnxruntime-gpu lists TensorRT even without libnvinfer; asking for it then logs an EP error per session."""
    monkeypatch.setattr(onnx_encoder.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    onnx_encoder.tensorrt_installed.cache_clear()
    monkeypatch.setattr(onnx_encoder.ctypes, "CDLL", missing)
    try:
        assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    finally:
        onnx_encoder.tensorrt_installed.cache_clear()


def test_cuda_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(onnx_encoder.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-gpu"):
        select_providers("cuda")
    with pytest.raises(ValueError, match="'auto', 'cuda' or 'cpu'"):
        select_providers("tpu")


@pytest.mark.parametrize("requested, providers, has_fp16, expected", [
    ("auto", ["CPUExecutionProvider"], True, "fp32"),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, "fp16"),
    ("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], True, "fp16"),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], False, "fp32"),
    ("int8", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, "int8"),
])
def test_variant_choice_prefers_fp16_on_gpus_only(tmp_path, requested, providers, has_fp16, expected):
    from types import SimpleNamespace

    from core.bundle import OnnxFiles
    from core.onnx_encoder import choose_variant

    bundle = SimpleNamespace(path=tmp_path, config=SimpleNamespace(onnx=OnnxFiles()))

    if has_fp16:
        for name in ("image_encoder.fp16.onnx", "text_encoder.fp16.onnx"):
            (tmp_path / name).write_bytes(b"")
    assert choose_variant(requested, providers, bundle) == expected


def test_io_binding_path_gives_the_plain_run_results(encoder):
    """The IO-binding path (an option for GPUs) exercised on CPU: same outputs as a plain run."""
    images = random_images(3)
    plain = encoder.encode_images(images)
    encoder.io_binding = True
    try:
        bound = encoder.encode_images(images)
        texts = encoder.encode_texts(["a b", "c"])
    finally:
        encoder.io_binding = False
    assert set(bound) == set(plain)
    for name in plain:
        np.testing.assert_allclose(bound[name], plain[name], atol=1e-6)
    assert texts["embedding"].shape[0] == 2


def test_io_binding_is_off_by_default(encoder):
    assert encoder.io_binding is False
