"""What `make demo` prints once the service is up: an API key file, example calls that work as printed, and the
address of the web page."""

from __future__ import annotations

import sys
from pathlib import Path

from service.auth import new_key, read_key_file, write_key_file

DEMO_KEY_NAME = "demo"


def create_demo_key(path: Path, scopes: tuple[str, ...] = ("admin",)) -> str:
    """A fresh key for the demo, stored hashed in `path` in place of the previous demo key (a stored key cannot be
    shown again, so each run makes a new one); the file's other keys stay, plain ones hashed."""
    records, _ = read_key_file(path)
    kept = [record for record in records if record.get("name") != DEMO_KEY_NAME]
    key, record = new_key(list(scopes), DEMO_KEY_NAME, taken={r.get("id") for r in kept})
    write_key_file(path, [*kept, record])
    return key


def example_commands(base_url: str, key: str, image: Path, collection: str = "emoji") -> str:
    """curl commands for embeddings, tagging, search and clusters, an openai SDK snippet, and, last so that it is
    what a person sees, the web page's address."""
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

# the web page (search, tagging, clusters, models), once the server below is up; paste the key above into it:
#   {base_url}/ui
"""
