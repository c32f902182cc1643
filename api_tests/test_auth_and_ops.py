"""Auth scopes on every resource, health/readiness, Prometheus metrics, request ids, CORS, body limits."""

from __future__ import annotations

import pytest

from api_tests.helpers import error_of

ROUTES = [  # (method, path, json, scope needed)
    ("POST", "/v1/embeddings", {"input": "x", "model": "active"}, "read"),
    ("POST", "/v1/embed/text", {"texts": ["x"]}, "read"),
    ("POST", "/v1/classify", {"images": [], "labels": ["a"]}, "read"),
    ("GET", "/v1/models", None, "read"),
    ("GET", "/v1/collections", None, "read"),
    ("PUT", "/v1/label-sets/colours", {"labels": ["red", "blue"]}, "write"),
    ("POST", "/v1/collections/authz/items", {"items": [{"id": "a", "text": "x"}]}, "write"),
    ("PUT", "/v1/collections/authz-2", {}, "admin"),
    ("POST", "/v1/models/rollback", None, "admin"),
    ("POST", "/knn-service", {"text": "x", "indice_name": "authz"}, "read"),
    ("POST", "/vectorize", {"texts": ["x"]}, "read"),
]
LEVEL = {"reader-key": 0, "writer-key": 1, "admin-key": 2}
NEEDED = {"read": 0, "write": 1, "admin": 2}


@pytest.fixture(scope="module", autouse=True)
def authz_collection(server):
    with server.client("admin-key") as admin:
        admin.put("/v1/collections/authz", json={"modality": "text"})


@pytest.mark.parametrize("method, path, body, scope", ROUTES)
@pytest.mark.parametrize("key", [None, "wrong-key", "reader-key", "writer-key", "admin-key"])
def test_scopes(server, method, path, body, scope, key):
    with server.client(key) as client:
        response = client.request(method, path, json=body)
    if key is None or key == "wrong-key":
        assert response.status_code == 401, response.text
    elif LEVEL[key] < NEEDED[scope]:
        assert response.status_code == 403, response.text
    else:
        assert response.status_code not in (401, 403), response.text


def test_health_ready_and_metrics_need_no_key(server):
    with server.client(None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        client.post("/v1/embeddings", json={"input": "x"})  # a 401, counted
        metrics = client.get("/metrics").text
    assert ready["status"] == "ready" and ready["model"].startswith("tiny-xclip")
    assert 'xclip_requests_total{method="POST",route="/v1/embeddings",status="401"}' in metrics
    assert "xclip_request_seconds_bucket" in metrics and "xclip_queue_depth" in metrics
    assert 'xclip_collection_items{collection="authz"}' in metrics


def test_request_ids_are_echoed_and_logged(server):
    with server.client("reader-key") as client:
        response = client.get("/v1/models", headers={"X-Request-ID": "trace-me-42"})
    assert response.headers["X-Request-ID"] == "trace-me-42"
    server.wait_for_log('"request_id": "trace-me-42"')


def test_cors_preflight_allows_browser_front_ends(server):
    with server.client(None) as client:
        response = client.options("/knn-service", headers={"Origin": "https://rom1504.github.io",
                                                           "Access-Control-Request-Method": "POST"})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] in ("*", "https://rom1504.github.io")


def test_oversize_body_is_413(server):
    with server.client("reader-key") as client:
        response = client.post("/v1/embeddings", content=b"{" + b" " * (33 * 1024 * 1024) + b"}",
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and error_of(response)["param"] == "body"


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing-here", 404), ("DELETE", "/healthz", 405)])
def test_unknown_routes_use_the_error_shape(server, method, path, status):
    with server.client("reader-key") as client:
        response = client.request(method, path)
    assert response.status_code == status and error_of(response)
