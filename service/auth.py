"""API keys with scopes (`read` < `write` < `admin`), sent as `Authorization: Bearer <key>`: the key file, which
stores a salted hash of each key and never the key, and the check that compares a request's key in constant time.

A key reads `xcs_<id>_<secret>`: the public id names the one record to compare with, so a request costs one HMAC
whatever the number of keys. The secret is 256 random bits, which is why a fast salted hash is enough (a slow one,
scrypt or bcrypt, would protect guessable passwords and make every request a CPU cost an attacker controls)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.errors import AuthenticationError, PermissionDeniedError

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "xcs"
HASH_SCHEME = "hmac-sha256"
_ID = re.compile(r"[A-Za-z0-9]{1,32}")


@dataclass(frozen=True)
class StoredKey:
    """What is kept of a key: its public id (None for a key without one, e.g. a converted plain key) and a salted
    HMAC-SHA256 of the whole key."""

    key_id: str | None
    salt: bytes
    digest: bytes

    @classmethod
    def of(cls, key: str, key_id: str | None = None) -> StoredKey:
        """The stored form of `key`, with a fresh random salt."""
        salt = secrets.token_bytes(16)
        return cls(key_id, salt, _digest(salt, key))

    @classmethod
    def parse(cls, text: object, key_id: object) -> StoredKey:
        """From a record's `hash` and `id`; ValueError, which never repeats the hash, when either is malformed."""
        if key_id is not None and not (isinstance(key_id, str) and _ID.fullmatch(key_id)):
            raise ValueError("id must be 1-32 letters and digits")
        parts = text.split("$") if isinstance(text, str) else []
        if len(parts) != 3 or parts[0] != HASH_SCHEME:
            raise ValueError(f"hash must read '{HASH_SCHEME}$<salt>$<digest>' (as `xclip-serve keys` writes it)")
        try:
            salt, digest = _unb64(parts[1]), _unb64(parts[2])
        except (ValueError, binascii.Error) as err:
            raise ValueError("hash: salt and digest must be unpadded base64url") from err
        if len(salt) < 16 or len(digest) != hashlib.sha256().digest_size:
            raise ValueError("hash: salt must be at least 16 bytes and digest 32")
        return cls(key_id, salt, digest)

    def encoded(self) -> str:
        """The record's `hash` field."""
        return f"{HASH_SCHEME}${_b64(self.salt)}${_b64(self.digest)}"

    def matches(self, key: str) -> bool:
        """Whether `key` is this key, compared in constant time."""
        return hmac.compare_digest(_digest(self.salt, key), self.digest)


def _digest(salt: bytes, key: str) -> bytes:
    return hmac.new(salt, key.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def key_id_of(key: str) -> str | None:
    """The public id of a `xcs_<id>_<secret>` key; None for a key of another form."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    return key_id if prefix == KEY_PREFIX and key_id and secret else None


def expand_scopes(label: str, scopes: object) -> frozenset[str]:
    """Validated scopes of one key (named by `label` in errors, never by the key), with the implied lower ones."""
    if isinstance(scopes, str):
        scopes = [scopes]
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise ValueError(f"{label}: scopes must be a non-empty list from {SCOPES}, got {scopes!r}")
    level = max(SCOPES.index(s) for s in scopes)
    return frozenset(SCOPES[: level + 1])


# -- the key file -----------------------------------------------------------------------------------------------------
def parse_keys(raw: str, source: str) -> dict[str | StoredKey, frozenset[str]]:
    """{key, or the stored hash of one: scopes} from JSON in either format: hashed `{"keys": [records]}` or plain
    `{"key": ["read", ...]}`; ValueError naming `source` when malformed."""
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{source}: API keys must be JSON, {{\"keys\": [...]}} as `xclip-serve keys` writes it "
                         f"or {{\"key\": [\"read\", ...]}}: {err}") from err
    if is_hashed(parsed):
        return _stored_keys(parsed["keys"], source)
    if not isinstance(parsed, dict):
        raise ValueError(f"{source}: API keys must be a JSON object")  # noqa: TRY004 (pydantic wants ValueError)
    return {str(key): expand_scopes(f"{source}: key {n}", scopes)
            for n, (key, scopes) in enumerate(parsed.items(), start=1)}


def is_hashed(parsed: object) -> bool:
    """A hashed file's `{"keys": [records]}`, told from a plain file by its list of objects, not of scopes."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        return False
    return not parsed["keys"] or not all(isinstance(item, str) for item in parsed["keys"])


def _stored_keys(records: list, source: str) -> dict[StoredKey, frozenset[str]]:
    keys: dict[StoredKey, frozenset[str]] = {}
    for n, record in enumerate(records, start=1):
        label = f"{source}: key {n}"
        if not isinstance(record, dict):
            raise ValueError(f"{label}: a record must be an object with `hash` and `scopes`")  # noqa: TRY004
        try:
            stored = StoredKey.parse(record.get("hash"), record.get("id"))
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from err
        if stored.key_id is not None and any(k.key_id == stored.key_id for k in keys):
            raise ValueError(f"{label}: id {stored.key_id!r} appears twice")
        keys[stored] = expand_scopes(label, record.get("scopes"))
    return keys


def read_key_file(path: Path) -> tuple[list[dict], int]:
    """A key file's records ([] when absent), its plain keys (if any) turned into hashed records, and how many
    keys were plain; ValueError when malformed."""
    raw = path.read_text() if path.is_file() else ""
    parse_keys(raw, str(path))  # validates either format
    parsed = json.loads(raw) if raw.strip() else {"keys": []}
    if is_hashed(parsed):
        return parsed["keys"], 0
    return [key_record(key, scopes) for key, scopes in parsed.items()], len(parsed)


def new_key(scopes: list[str], name: str | None = None, taken: Collection[str] = ()) -> tuple[str, dict]:
    """A fresh random key `xcs_<id>_<secret>`, to be shown once, and the record that stores its hash."""
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return key, key_record(key, scopes, key_id, name)


def key_record(key: str, scopes: str | list[str], key_id: str | None = None, name: str | None = None) -> dict:
    """A key file's record of one key: its id, name, salted hash and scopes, never the key."""
    scopes = [scopes] if isinstance(scopes, str) else list(scopes)
    expand_scopes("key", scopes)
    record = {"id": key_id, "name": name, "hash": StoredKey.of(key, key_id).encoded(), "scopes": scopes,
              "created": datetime.now(UTC).isoformat(timespec="seconds")}
    return {field: value for field, value in record.items() if value is not None}


def write_key_file(path: Path, records: list[dict]) -> None:
    """Replace `path` by these records atomically (a crash leaves the old file or the new, never half of one),
    readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created with mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"keys": records}, out, indent=1)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the check --------------------------------------------------------------------------------------------------------
class KeyChecker:
    """Maps a bearer token to its scopes; `enabled=False` lets every request through (development only)."""

    def __init__(self, keys: Mapping[str | StoredKey, frozenset[str]], enabled: bool = True):
        # plain keys (XCLIP_API_KEYS, a plain file) are hashed here too: the checker keeps no key as given
        stored = [(k if isinstance(k, StoredKey) else StoredKey.of(k), scopes) for k, scopes in keys.items()]
        self._by_id = {k.key_id: (k, scopes) for k, scopes in stored if k.key_id is not None}
        self._without_id = [(k, scopes) for k, scopes in stored if k.key_id is None]
        self.enabled = enabled

    def scopes_of(self, authorization: str | None) -> frozenset[str]:
        """Scopes of the request's key; AuthenticationError (401) for a missing or unknown key."""
        if not self.enabled:
            return frozenset(SCOPES)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", "authorization")
        presented = token.strip()
        found = frozenset()
        for stored, scopes in self._candidates(presented):  # no early exit: every candidate is compared
            if stored.matches(presented):
                found = scopes
        if not found:
            raise AuthenticationError("invalid API key", "authorization")
        return found

    def _candidates(self, key: str) -> list[tuple[StoredKey, frozenset[str]]]:
        """The one record the key's id names; else every key without an id (plain and converted keys)."""
        record = self._by_id.get(key_id_of(key))
        return [record] if record else self._without_id

    def require(self, authorization: str | None, scope: str, known: frozenset[str] | None = None) -> None:
        """401 without a valid key, 403 when the key lacks `scope`; `known`: the key's scopes, already looked up
        for this request (by the request gate), so the key is not hashed twice."""
        if scope not in (known if known is not None else self.scopes_of(authorization)):
            raise PermissionDeniedError(f"this API key lacks the '{scope}' scope", "authorization")
