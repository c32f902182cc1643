"""The OpenAPI document (`/docs`, `/openapi.json`): it builds and every `$ref` in it resolves."""

from __future__ import annotations

import json
import re

from service.app import create_app
from service.settings import Settings


def test_openapi_builds_and_every_reference_resolves():
    spec = create_app(Settings(auth_disabled=True)).openapi()
    schemas = spec["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs and refs <= set(schemas), refs - set(schemas)
    classify = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(classify)
    assert "/v1/embeddings" in spec["paths"] and "/knn-service" in spec["paths"]
