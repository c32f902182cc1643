"""Schemathesis over the whole OpenAPI document the running server publishes (`/openapi.json`): every operation
fuzzed with schema-valid and schema-invalid requests, every check on (no 5xx; each response's status, content
type, headers and body as documented; invalid requests refused; 405 with `Allow` for undeclared methods).

Three runs, bounded and derandomized so that `make test` stays fast and reproducible: with a read key against
the module's server (mutating routes answer 403, nothing stored changes), with an unknown key (401 everywhere but
the probes and metrics), and with an admin key against a server of its own that it may wreck. Path parameters are steered half of the time to names that exist (seeded
collections, items, label set, models), so that the by-name routes get past their 404s.

schemathesis's own pytest plugin loads a schema from a fixture through `from_fixture`, which does not run under
pytest 9 (it sets `Function._nodeid`): the runs use its engine, the code behind `schemathesis run`, instead."""

from __future__ import annotations

import base64
import zlib
from collections import Counter, defaultdict

import pytest
import schemathesis
from schemathesis.engine import StopReason, events, from_schema

from api_tests.conftest import Server
from api_tests.helpers import png_bytes

EXAMPLES_PER_OPERATION = 12
SEED = 20240601
SEEDED = {"fuzz-images": "image", "fuzz-texts": "text"}
LABEL_SET = "fuzz-labels"
# the routes a read key may not use (write or admin scope)
MUTATING = {"PUT /v1/label-sets/{name}", "DELETE /v1/label-sets/{name}", "PUT /v1/collections/{name}",
            "DELETE /v1/collections/{name}", "POST /v1/collections/{name}/reembed",
            "POST /v1/collections/{name}/items", "POST /v1/collections/{name}/items/delete",
            "DELETE /v1/collections/{name}/items/{item_id}", "POST /v1/models", "DELETE /v1/models/{model_id}",
            "POST /v1/models/rollback", "POST /v1/models/{model_id}/activate"}
OPEN = {"GET /healthz", "GET /readyz", "GET /metrics"}  # no key needed
# Every check schemathesis has, but one. `positive_data_acceptance` wants every schema-valid request answered
# 2xx, and the schema cannot say what else a valid request needs: decodable image bytes, a non-blank text within
# the model's context, a model that can truncate to `dimensions`, an existing collection of the right modality.
# Those requests are refused with a documented 4xx that `status_code_conformance` and
# `response_schema_conformance` still check.
CHECKS = {"enabled": True, "positive_data_acceptance": {"enabled": False}}


@schemathesis.check
def read_key_cannot_write(ctx, response, case) -> None:
    """A read key on a write or admin route: 403, unless the request was refused before its scope was looked at
    (a body that is not JSON 400, over the size limit 413, holding a lone surrogate 422)."""
    if (response.request.headers.get("Authorization") != "Bearer reader-key"
            or case.method.upper() != case.operation.method.upper()):  # an undeclared method: 405 first
        return
    if case.operation.label in MUTATING and response.status_code not in (400, 403, 413, 422):
        raise AssertionError(f"read key on {case.operation.label}: {response.status_code}, expected 403")


def seed(server: Server) -> dict[str, list[str]]:
    """Two small collections (image and text items) and a label set; {collection: its item ids}."""
    image = base64.b64encode(png_bytes()).decode()
    items = {"fuzz-images": [{"id": f"img-{i}", "image": image, "metadata": {"n": i}} for i in range(3)],
             "fuzz-texts": [{"id": f"txt/{i}", "text": f"text number {i}", "metadata": {"n": i}} for i in range(3)]}
    with server.client("admin-key") as admin:
        for name, modality in SEEDED.items():
            admin.put(f"/v1/collections/{name}", json={"modality": modality}).raise_for_status()
            admin.post(f"/v1/collections/{name}/items", json={"items": items[name]}).raise_for_status()
        admin.put(f"/v1/label-sets/{LABEL_SET}", json={"labels": ["red", "blue"]}).raise_for_status()
    return {name: [item["id"] for item in rows] for name, rows in items.items()}


def stored(server: Server) -> dict[str, list[str]]:
    """{seeded collection: its item ids now}."""
    with server.client("admin-key") as admin:
        return {name: admin.get(f"/v1/collections/{name}/items").json()["ids"] for name in SEEDED}


def model_ids(server: Server) -> list[str]:
    with server.client("admin-key") as admin:
        return [m["id"] for m in admin.get("/v1/models").json()["data"]]


def steer_path_parameters(names: list[str], items: dict[str, list[str]], models: list[str]):
    """A `map_path_parameters` hook that swaps about half of the generated values for existing ones (an item
    id of the collection chosen), picked by a hash of the generated values so that runs stay reproducible."""
    def map_path_parameters(context, path_parameters: dict | None) -> dict | None:
        pick = zlib.crc32(repr(sorted((path_parameters or {}).items())).encode())
        if not path_parameters or pick % 2:
            return path_parameters
        steered = dict(path_parameters)
        if "name" in steered:
            steered["name"] = names[pick // 2 % len(names)]
        if "item_id" in steered:  # one of the collection's items
            steered["name"] = list(items)[pick // 2 % len(items)]
            ids = items[steered["name"]]
            steered["item_id"] = ids[pick // 8 % len(ids)]
        if "model_id" in steered:
            steered["model_id"] = models[pick // 2 % len(models)]
        return steered

    return map_path_parameters


def fuzz(server: Server, key: str, items: dict[str, list[str]], examples: int = EXAMPLES_PER_OPERATION,
         checks: dict = CHECKS) -> dict:
    """Run every phase but the stateful one over every operation; {"statuses": {operation: Counter},
    "failures": [text]}."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large", "large_base_example"],
        "headers": {"Authorization": f"Bearer {key}"},
        "generation": {"max-examples": examples, "deterministic": True, "database": "none",
                       "mode": "all"},
        "checks": checks,
        # stateless: the stateful phase follows links the document does not declare
        "phases": {"stateful": {"enabled": False}},
    })
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=config)
    schema.hook(steer_path_parameters([*SEEDED, LABEL_SET], items, model_ids(server)))
    statuses: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            failures += _record(event.recorder, statuses)
        elif isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: error in schemathesis or a hook: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            assert event.stop_reason == StopReason.COMPLETED, event.stop_reason
            failures += [f"{f.operation}: {f.title}: {f.message}" for f in event.failures]
    return {"statuses": statuses, "failures": failures}


def _record(recorder, statuses: dict[str, Counter]) -> list[str]:
    """Count the status of each response to the operation's own method under the operation (those to undeclared
    methods are `unsupported_method`'s); a line per failed check, with a curl to reproduce."""
    failures = []
    for case_id, interaction in recorder.interactions.items():
        case = recorder.cases[case_id].value
        if interaction.response is not None and case.method.upper() == case.operation.method.upper():
            statuses[recorder.label][interaction.response.status_code] += 1
        for check in recorder.checks.get(case_id, []):
            if check.failure_info is not None:
                failure = check.failure_info.failure
                failures.append(f"{recorder.label}: {check.name}: {failure.title}: {failure.message}\n"
                                f"    {check.failure_info.code_sample}")
    return failures


def operations(server: Server) -> set[str]:
    with server.client() as client:
        document = client.get("/openapi.json").json()
    return {f"{method.upper()} {path}" for path, methods in document["paths"].items() for method in methods}


@pytest.fixture(scope="module")
def seeded(server):
    return seed(server)


@pytest.fixture(scope="module")
def scratch_server(tmp_path_factory, bundles):
    """A server of its own for the admin run, which may delete anything; a second model is registered so that
    activate, rollback and unregister have something to act on."""
    server = Server(tmp_path_factory.mktemp("fuzz-admin") / "state", bundles["xclip"]).start()
    with server.client("admin-key") as admin:
        admin.post("/v1/models", json={"path": str(bundles["xclip-b"])}).raise_for_status()
    yield server
    server.stop()


def test_fuzz_with_a_read_key(server, seeded):
    run = fuzz(server, "reader-key", seeded)
    assert not run["failures"], "\n".join(run["failures"])
    statuses = run["statuses"]
    assert set(statuses) == operations(server)  # every operation was exercised
    for label in MUTATING:
        assert not any(200 <= status < 300 for status in statuses[label]), (label, statuses[label])
    # steering reached existing names: the by-name read routes found something
    for label in ("GET /v1/collections/{name}", "GET /v1/collections/{name}/items/{item_id}",
                  "POST /v1/collections/{name}/search", "GET /v1/models/{model_id}"):
        assert statuses[label][200], (label, statuses[label])
    assert stored(server) == seeded  # nothing stored changed
    with server.client("reader-key") as client:
        assert client.get("/readyz").status_code == 200


def test_fuzz_with_an_admin_key(scratch_server):
    run = fuzz(scratch_server, "admin-key", seed(scratch_server))
    assert not run["failures"], "\n".join(run["failures"])
    statuses = run["statuses"]
    assert set(statuses) == operations(scratch_server)
    # it did act: label sets written, models hot-swapped, collections deleted
    for label, status in (("PUT /v1/label-sets/{name}", 201), ("POST /v1/models/{model_id}/activate", 200),
                          ("DELETE /v1/collections/{name}", 204)):
        assert statuses[label][status], (label, statuses[label])
    with scratch_server.client("admin-key") as admin:
        assert admin.get("/healthz").json() == {"status": "ok"}
        assert admin.get("/v1/models").status_code == 200


def test_fuzz_with_an_unknown_key(server, seeded):
    # The request gate refuses an unknown key (401) before the router looks at the method, so that nobody
    # without a key makes the server read a body: `unsupported_method` (405 for an undeclared method) is checked
    # by the runs with a key.
    run = fuzz(server, "not-a-key", seeded, examples=3, checks={**CHECKS, "unsupported_method": {"enabled": False}})
    assert not run["failures"], "\n".join(run["failures"])
    statuses = run["statuses"]
    assert set(statuses) == operations(server)
    for label, seen in statuses.items():
        assert set(seen) == ({200} if label in OPEN else {401}), (label, seen)
