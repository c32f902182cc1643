"""A server started on XCLIP_API_KEYS_FILE of hashed keys made by `xclip-serve keys create`: each key works with
its scope and no more, and the file holds no key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api_tests.conftest import Server


def create_key(path, scope: str) -> str:
    """A key made by the CLI, as it prints it."""
    command = [sys.executable, "-m", "xclip_serve.cli", "keys", "create", "--file", str(path), "--scope", scope]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def key_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("key-file")
    path = root / "api-keys.json"
    keys = {"reader": create_key(path, "read"), "admin": create_key(path, "admin")}
    server = Server(root / "state", None, {"XCLIP_API_KEYS": "", "XCLIP_API_KEYS_FILE": str(path)}).start()
    yield server, keys, path
    server.stop()


@pytest.mark.parametrize("who, method, status", [
    ("reader", "GET", 200),
    ("reader", "PUT", 403),
    ("admin", "PUT", None),  # past auth (no model is active, so the collection itself is refused)
    ("wrong", "GET", 401),
])
def test_hashed_keys_from_the_file_authenticate_with_their_scopes(key_server, who, method, status):
    server, keys, _ = key_server
    wrong = keys["reader"][:-4] + "AAAA"
    with server.client(keys.get(who, wrong)) as client:
        response = client.request(method, "/v1/collections" + ("/made" if method == "PUT" else ""),
                                  json={"modality": "text"} if method == "PUT" else None)
    if status is None:
        assert response.status_code not in (401, 403), response.text
    else:
        assert response.status_code == status, response.text


def test_the_key_file_and_the_log_hold_no_key(key_server):
    server, keys, path = key_server
    for key in keys.values():  # a request with each key, and its access line written, before the log is read
        with server.client(key) as client:
            client.get("/v1/models", headers={"X-Request-ID": f"no-key-{key[-4:]}"})
        server.wait_for_log(f"no-key-{key[-4:]}")
    assert not any(key in path.read_text() or key in server.logs() for key in keys.values())
