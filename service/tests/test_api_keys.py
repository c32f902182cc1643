"""API key files: keys stored as salted hashes and shown once (`xclip-serve keys`, `demo-info`), checked with their
scopes; plain-text files keep working, with a start-up warning that never shows a key."""

from __future__ import annotations

import json
import logging
import re
import stat

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from service.auth import KeyChecker
from service.errors import AuthenticationError, PermissionDeniedError
from service.settings import Settings
from xclip_serve.cli import app


def cli(*args: str) -> str:
    """stdout of a successful `xclip-serve` command."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def create_key(path, scope: str, *options: str) -> str:
    return cli("keys", "create", "--file", str(path), "--scope", scope, *options).strip()


def checker(path) -> KeyChecker:
    """The server's check, built from XCLIP_API_KEYS_FILE as at start-up."""
    return KeyChecker(Settings(api_keys=None, api_keys_file=path).key_scopes())


def check(keys: KeyChecker, key: str | None, scope: str, error: type[Exception] | None) -> None:
    header = f"Bearer {key}" if key is not None else None
    if error is None:
        keys.require(header, scope)
    else:
        with pytest.raises(error):
            keys.require(header, scope)


@pytest.fixture
def key_file(tmp_path):
    """A file with a `read` and a `write` key made by `keys create`, and the keys as printed."""
    path = tmp_path / "api-keys.json"
    return path, {"reader": create_key(path, "read"), "writer": create_key(path, "write", "--name", "ci")}


@pytest.mark.parametrize("who, scope, error", [
    ("reader", "read", None),
    ("writer", "read", None),
    ("writer", "write", None),
    ("reader", "write", PermissionDeniedError),
    ("writer", "admin", PermissionDeniedError),
    ("tampered", "read", AuthenticationError),
    ("unknown", "read", AuthenticationError),
    (None, "read", AuthenticationError),
])
def test_a_hashed_file_grants_each_created_key_its_scope_and_no_more(key_file, who, scope, error):
    path, keys = key_file
    keys = {**keys, "tampered": keys["reader"][:-4] + "AAAA", "unknown": "xcs_00000000_nope"}
    check(checker(path), keys.get(who), scope, error)


def test_the_file_stores_hashes_with_ids_names_and_scopes_never_a_key(key_file):
    path, keys = key_file
    text = path.read_text()
    records = json.loads(text)["keys"]
    assert not any(key in text or key.split("_", 2)[2] in text for key in keys.values())
    assert [(keys["reader"].split("_")[1], ["read"]), (keys["writer"].split("_")[1], ["write"])] == [
        (r["id"], r["scopes"]) for r in records]
    assert records[1]["name"] == "ci" and all(r["hash"].startswith("hmac-sha256$") for r in records)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_plain_file_still_works_and_start_up_warns_without_showing_a_key(tmp_path, caplog):
    path = tmp_path / "api-keys.json"
    path.write_text(json.dumps({"plain-secret-key": ["write"]}))
    with caplog.at_level(logging.WARNING, logger="service.settings"):
        keys = checker(path)
    assert "keys hash-file" in caplog.text and str(path) in caplog.text
    assert "plain-secret-key" not in caplog.text
    check(keys, "plain-secret-key", "write", None)
    check(keys, "plain-secret-key", "admin", PermissionDeniedError)


def test_hash_file_converts_a_plain_file_in_place_and_its_keys_keep_working(tmp_path, caplog):
    path = tmp_path / "api-keys.json"
    path.write_text(json.dumps({"old-reader-key": ["read"], "old-admin-key": "admin"}))
    path.chmod(0o644)
    cli("keys", "hash-file", str(path))
    assert "old-" not in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o600
    with caplog.at_level(logging.WARNING, logger="service.settings"):
        keys = checker(path)
    assert "plain text" not in caplog.text
    check(keys, "old-reader-key", "read", None)
    check(keys, "old-reader-key", "write", PermissionDeniedError)
    check(keys, "old-admin-key", "admin", None)
    new = create_key(path, "read")  # a hashed file takes new keys, and the converted ones stay
    check(checker(path), new, "read", None)
    check(checker(path), "old-admin-key", "admin", None)


def test_keys_create_refuses_a_plain_file_and_names_the_fix(tmp_path):
    path = tmp_path / "api-keys.json"
    path.write_text(json.dumps({"plain-secret-key": ["read"]}))
    result = CliRunner().invoke(app, ["keys", "create", "--file", str(path), "--scope", "read"])
    assert result.exit_code == 2 and "keys hash-file" in result.output
    assert json.loads(path.read_text()) == {"plain-secret-key": ["read"]}


def test_keys_create_refuses_an_unknown_scope(tmp_path):
    result = CliRunner().invoke(app, ["keys", "create", "--file", str(tmp_path / "k.json"), "--scope", "root"])
    assert result.exit_code == 2 and "scope" in result.output and not (tmp_path / "k.json").exists()


def test_hashed_records_in_the_environment_work_too(key_file):
    path, keys = key_file
    check(KeyChecker(Settings(api_keys=path.read_text()).key_scopes()), keys["writer"], "write", None)


def mangle(records: list[dict], **changes) -> str:
    return json.dumps({"keys": [{**records[0], **changes}, *records[1:]]})


@pytest.mark.parametrize("changes, message", [
    ({"hash": "sha256$abc"}, "hash must read 'hmac-sha256"),
    ({"hash": "hmac-sha256$!!$!!"}, "base64"),
    ({"scopes": ["root"]}, "scopes must be"),
    ({"id": "same"}, "id 'same' appears twice"),
    ({"id": "not_an_id"}, "id must be"),
])
def test_a_malformed_hashed_file_fails_at_start_up_naming_the_file_and_record(key_file, changes, message):
    path, _ = key_file
    records = json.loads(path.read_text())["keys"]
    if changes.get("id") == "same":
        records[1]["id"] = "same"
    path.write_text(mangle(records, **changes))
    with pytest.raises(ValidationError, match=re.escape(message)) as info:
        Settings(api_keys=None, api_keys_file=path)
    assert f"XCLIP_API_KEYS_FILE {path}: key " in str(info.value)


def test_a_file_that_is_not_json_fails_at_start_up_naming_the_file(tmp_path):
    path = tmp_path / "api-keys.json"
    path.write_text("reader=read")
    with pytest.raises(ValidationError, match=f"XCLIP_API_KEYS_FILE {re.escape(str(path))}: .*must be JSON"):
        Settings(api_keys=None, api_keys_file=path)


def demo_key(output: str) -> str:
    return re.search(r"Authorization: Bearer (\S+)\"", output).group(1)


def test_demo_info_prints_a_working_key_each_run_and_stores_only_its_hash(tmp_path):
    path, image = tmp_path / "state" / "api-keys.json", tmp_path / "cat.png"
    other = create_key(path, "read")
    first = demo_key(cli("demo-info", "--key-file", str(path), "--image", str(image)))
    second = demo_key(cli("demo-info", "--key-file", str(path), "--image", str(image)))
    keys = checker(path)
    check(keys, second, "admin", None)
    check(keys, first, "read", AuthenticationError)  # a hashed key cannot be shown again: each run makes a new one
    check(keys, other, "read", None)
    assert second not in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o600
