"""The service's one settings object: environment variables with the `XCLIP_` prefix, validated at start-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.auth import StoredKey, parse_keys

logger = logging.getLogger(__name__)


class Settings(BaseSettings):
    """Every knob of the server; `XCLIP_<NAME>` in the environment (e.g. `XCLIP_PORT=8000`)."""

    model_config = SettingsConfigDict(env_prefix="XCLIP_", extra="forbid", hide_input_in_errors=True)

    # where things are
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    bundle: Path | None = Field(None, description="Bundle registered and activated at start-up.")
    state_dir: Path = Field(Path("serve-state"), description="Model registry state and collections.")
    # auth: keys as JSON or a file of it, hashed {"keys": [...]} as `xclip-serve keys` writes it or plain
    # {"key": ["read", "write"]} (a plain file logs a warning); auth off only when said explicitly
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
    # decoded pixels (from the images' headers, before decoding): per request, and across requests decoding at
    # once; a 6000x6000 PNG is 36 M pixels and ~150 MB decoded, whatever its size on the wire
    max_request_pixels: int = Field(100_000_000, ge=64, description="Decoded pixels per request (413 beyond).")
    max_inflight_pixels: int = Field(200_000_000, ge=64,
                                     description="Decoded pixels being decoded at once (429 beyond).")
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
        if self.api_keys_file and not self.api_keys and any(isinstance(key, str) for key in keys):
            logger.warning("API key file %s stores its keys in plain text: replace them by salted hashes with "
                           "`xclip-serve keys hash-file %s` (the keys keep working)",
                           self.api_keys_file, self.api_keys_file)
        return self

    def key_scopes(self) -> dict[str | StoredKey, frozenset[str]]:
        """{api key, or the salted hash a key file stores of it: scopes}; `admin` implies `write` implies `read`."""
        if self.api_keys:
            return parse_keys(self.api_keys, "XCLIP_API_KEYS")
        if self.api_keys_file:
            return parse_keys(self.api_keys_file.read_text(), f"XCLIP_API_KEYS_FILE {self.api_keys_file}")
        return {}

    @property
    def collections_dir(self) -> Path:
        return self.state_dir / "collections"
