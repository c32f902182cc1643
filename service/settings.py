"""The service's one settings object: environment variables with the `XCLIP_` prefix, validated at start-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SCOPES = ("read", "write", "admin")


class Settings(BaseSettings):
    """Every knob of the server; `XCLIP_<NAME>` in the environment (e.g. `XCLIP_PORT=8000`)."""

    model_config = SettingsConfigDict(env_prefix="XCLIP_", extra="forbid")

    # where things are
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    bundle: Path | None = Field(None, description="Bundle registered and activated at start-up.")
    state_dir: Path = Field(Path("serve-state"), description="Model registry state and collections.")
    # auth: keys as JSON {"key": ["read", "write"]} or a file of the same; auth off only when said explicitly
    api_keys: str | None = None
    api_keys_file: Path | None = None
    auth_disabled: bool = False
    # clip-retrieval's and Weaviate's clients send no auth header: with keys on, their routes need a `read` key
    # unless named here (then they are open, and the start-up log says so)
    open_compat: list[Literal["clip-retrieval", "weaviate"]] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    # inference
    providers: Literal["auto", "cuda", "cpu"] = "auto"
    intra_op_threads: int | None = Field(None, ge=1)
    variant: Literal["auto", "fp32", "int8", "fp16"] = "auto"  # auto: fp16 on a GPU when the bundle has it
    faiss_device: Literal["auto", "cpu", "gpu"] = "auto"  # gpu needs faiss-gpu; auto uses one when present
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    max_queue: int = Field(1024, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    # limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=64)
    max_items: int = Field(256, ge=1, description="Inputs per request (images, texts, items, labels).")
    max_text_chars: int = Field(4096, ge=1)
    max_labels: int = Field(1000, ge=1)
    max_k: int = Field(1000, ge=1)
    # image URLs: off by default; when on, only these hosts, never private/loopback addresses
    url_fetch: bool = False
    url_allow_hosts: list[str] = Field(default_factory=list)
    url_timeout_s: float = Field(5.0, gt=0)
    log_json: bool = True
    log_level: str = "INFO"

    @field_validator("api_keys_file")
    @classmethod
    def _file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"api_keys_file {path} does not exist")
        return path

    @model_validator(mode="after")
    def _auth_configured(self) -> Settings:
        keys = self.key_scopes()
        if not keys and not self.auth_disabled:
            raise ValueError("no API keys configured: set XCLIP_API_KEYS or XCLIP_API_KEYS_FILE, "
                             "or XCLIP_AUTH_DISABLED=true to run without auth (development only)")
        return self

    def key_scopes(self) -> dict[str, frozenset[str]]:
        """{api key: scopes}; `admin` implies `write` implies `read`."""
        raw = self.api_keys or (self.api_keys_file.read_text() if self.api_keys_file else "")
        if not raw.strip():
            return {}
        try:
            parsed = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"API keys must be JSON {{\"key\": [\"read\", ...]}}: {err}") from err
        if not isinstance(parsed, dict):
            raise ValueError("API keys must be a JSON object of key → list of scopes")  # noqa: TRY004 (pydantic)
        return {str(key): _expand_scopes(key, scopes) for key, scopes in parsed.items()}

    @property
    def collections_dir(self) -> Path:
        return self.state_dir / "collections"


def _expand_scopes(key: str, scopes: object) -> frozenset[str]:
    """Validated scopes of one key, with the implied lower scopes added."""
    if isinstance(scopes, str):
        scopes = [scopes]
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise ValueError(f"key {key[:4]}…: scopes must be a non-empty list from {SCOPES}, got {scopes!r}")
    level = max(SCOPES.index(s) for s in scopes)
    return frozenset(SCOPES[: level + 1])
