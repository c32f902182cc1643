"""Embeddings over HTTP: the openai SDK (float and base64), images via the modality extension, native routes,
dynamic batching under concurrency, and parity with the training-side (torch) encoder."""

from __future__ import annotations

import base64
import concurrent.futures

import numpy as np
import openai
import pytest

from api_tests.helpers import error_of, image_b64, shape_images

TEXTS = ["red circle", "a square that is blue", "green triangle, a triangle icon"]


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="reader-key", max_retries=0)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_sdk_text_embeddings(sdk, encoding_format):
    response = sdk.embeddings.create(model="active", input=TEXTS, encoding_format=encoding_format)
    # asked for explicitly, base64 comes back as the string (the SDK decodes only when it chose base64 itself)
    vectors = np.asarray([np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding_format == "base64"
                          else d.embedding for d in response.data], np.float32)
    assert [d.index for d in response.data] == [0, 1, 2]
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.usage.prompt_tokens > 3 and response.model.startswith("tiny")


def test_sdk_default_format_and_float_agree(sdk):
    floats = sdk.embeddings.create(model="active", input=TEXTS, encoding_format="float")
    default = sdk.embeddings.create(model="active", input=TEXTS)  # recent SDKs ask for base64 and decode it
    np.testing.assert_allclose([d.embedding for d in default.data], [d.embedding for d in floats.data], atol=1e-6)


def test_base64_is_little_endian_float32(server):
    with server.client("reader-key") as client:
        body = client.post("/v1/embeddings", json={"input": "red circle", "model": "active",
                                                   "encoding_format": "base64"}).json()
        floats = client.post("/v1/embeddings", json={"input": "red circle", "model": "active"}).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)


def test_image_embeddings_through_the_sdk_match_the_torch_encoder(sdk, shapes, bundles):
    from core.preprocess import load_image
    from training.encoders import torch_encoder_from_bundle

    paths = shape_images(shapes, 4)
    response = sdk.embeddings.create(model="active", input=[image_b64(p) for p in paths],
                                     extra_body={"modality": "image"}, encoding_format="float")
    served = np.asarray([d.embedding for d in response.data], np.float32)
    torch_side = torch_encoder_from_bundle(bundles["xclip"]).encode_images([load_image(p) for p in paths])["embedding"]
    np.testing.assert_allclose(served, torch_side, atol=1e-4)


def test_unknown_model_is_404_in_openai_shape(sdk):
    with pytest.raises(openai.NotFoundError) as err:
        sdk.embeddings.create(model="no-such-model", input="x")
    assert err.value.body["param"] == "model"


def test_native_text_and_image_routes_agree_with_openai_route(server, shapes):
    path = shape_images(shapes, 1)[0]
    with server.client("reader-key") as client:
        text = client.post("/v1/embed/text", json={"texts": ["red circle"], "clusters": True}).json()
        image = client.post("/v1/embed/image", files=[("files", (path.name, path.read_bytes(), "image/png"))],
                            data={"clusters": "true", "cluster_top_k": "3"}).json()
        openai_image = client.post("/v1/embeddings", json={"input": [image_b64(path)], "model": "active",
                                                           "modality": "image"}).json()
    assert len(text["data"][0]["embedding"]) == 32 and len(text["data"][0]["clusters"]) == 5
    assert len(image["data"][0]["clusters"]) == 3 and image["data"][0]["entropy"] >= 0
    np.testing.assert_allclose(image["data"][0]["embedding"], openai_image["data"][0]["embedding"], atol=1e-6)


def test_many_images_in_one_multipart_request(server, shapes):
    paths = shape_images(shapes, 5)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    with server.client("reader-key") as client:
        body = client.post("/v1/embed/image", files=files).json()
    assert [d["index"] for d in body["data"]] == list(range(5))


def test_32_concurrent_callers_get_the_same_vectors_as_one_at_a_time(server, shapes):
    paths = shape_images(shapes, 32)
    payloads = [{"input": [image_b64(p)], "model": "active", "modality": "image"} for p in paths]
    with server.client("reader-key") as client:
        serial = [client.post("/v1/embeddings", json=p).json()["data"][0]["embedding"] for p in payloads]

        def call(payload):
            return client.post("/v1/embeddings", json=payload).json()["data"][0]["embedding"]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            concurrent_results = list(pool.map(call, payloads))
        metrics = client.get("/metrics").text
    np.testing.assert_allclose(concurrent_results, serial, atol=1e-5)
    batch_count = _metric(metrics, 'xclip_batch_size_count{modality="image"}')
    batch_sum = _metric(metrics, 'xclip_batch_size_sum{modality="image"}')
    assert batch_sum / batch_count > 1.0  # some requests really were coalesced


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


@pytest.mark.parametrize("payload, status, param", [
    ({"input": [], "model": "active"}, 422, "input"),
    ({"input": [""], "model": "active"}, 422, "input[0]"),
    ({"input": ["x"], "model": "active", "modality": "image"}, 422, "input[0]"),
    ({"input": ["aGVsbG8="], "model": "active", "modality": "image"}, 422, "input[0]"),
    ({"input": "x", "model": "active", "dimensions": 8}, 400, "dimensions"),
    ({"input": "x", "model": "active", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"input": 5, "model": "active"}, 422, "input"),
    ({"input": "x", "model": "active", "surprise": 1}, 422, "surprise"),
    ({"input": ["word " * 500], "model": "active"}, 413, "input"),
])
def test_bad_embedding_requests_are_4xx_naming_the_field(server, payload, status, param):
    with server.client("reader-key") as client:
        response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == status, response.text
    assert error_of(response)["param"].startswith(param)
