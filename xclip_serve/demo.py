"""What `make demo` prints once the service is up: an API key file and example calls that work as printed."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path


def ensure_key_file(path: Path, scopes: tuple[str, ...] = ("admin",)) -> str:
    """The key of a one-key file (created with a fresh random key, mode 600, if absent)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "xcs-" + secrets.token_urlsafe(24)
        path.write_text(json.dumps({key: list(scopes)}, indent=1))
        os.chmod(path, 0o600)
    return next(iter(json.loads(path.read_text())))


def example_commands(base_url: str, key: str, image: Path, collection: str = "emoji") -> str:
    """curl commands for embeddings, tagging, search and clusters, plus an openai SDK snippet."""
    python = sys.executable  # the project's interpreter, which has the openai SDK
    auth = f'-H "Authorization: Bearer {key}"'
    js = '-H "Content-Type: application/json"'
    return f"""
# is it ready?
curl -s {base_url}/readyz
# text embeddings, OpenAI-compatible
curl -s {base_url}/v1/embeddings {auth} {js} -d '{{"model": "active", "input": ["a cat face"]}}' | head -c 300; echo
# zero-shot tags for an uploaded image, against the bundle's label set "category"
curl -s {base_url}/v1/classify {auth} -F files=@{image} -F label_set=category -F top_k=3
# search the demo images by text, then images similar to a stored one
curl -s {base_url}/v1/collections/{collection}/search {auth} {js} -d '{{"text": "a cat face", "k": 5}}'
curl -s {base_url}/v1/collections/{collection}/search {auth} {js} -d '{{"image": "'$(base64 -w0 {image})'", "k": 5}}'
# the image's nCLIP clusters
curl -s {base_url}/v1/embed/image {auth} -F files=@{image} -F clusters=true -F cluster_top_k=3 | tail -c 300; echo
# the openai SDK
{python} -c "import openai; c = openai.OpenAI(base_url='{base_url}/v1', api_key='{key}'); \\
print(len(c.embeddings.create(model='active', input='a red heart').data[0].embedding))"
# interactive API docs: {base_url}/docs
"""
