"""Schema fuzzing of the whole HTTP API from its own OpenAPI document (schemathesis), against a real server.

Every operation the document lists gets valid and invalid requests (bodies, query strings, path parameters,
headers). Each answer must not be a 5xx, must carry a status the document lists for that operation, and must
match the documented body schema, content type and headers. The class endpoints are fuzzed with the admin token
(so requests reach validation) and the auth tests cover the refusals without it.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "schema-fuzz-token"
EXAMPLES_PER_OPERATION = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("schema-fuzz")
    env = {
        "VLLTR_ADMIN_TOKEN": TOKEN,
        "VLLTR_CLASS_STORE": str(workdir / "classes.json"),
        "VLLTR_MAX_IMAGE_BYTES": "65536",
    }
    srv = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    config = SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            "request-timeout": 60,
            # The document states the file count of a batch (`maxItems`); more files are refused with 413 (too
            # large), which is a refusal as much as the 4xx statuses schemathesis expects by default.
            "checks": {
                "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 406, 413, 422, 428, "5XX"]}
            },
        }
    )
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


# The operations of the document, listed here so each is its own test (and a route that vanishes from the
# document fails `test_the_document_covers_every_route` instead of silently going unfuzzed).
OPERATIONS = [
    ("POST", "/v1/classify"),
    ("POST", "/v1/classify/batch"),
    ("GET", "/v1/classes"),
    ("POST", "/v1/classes"),
    ("DELETE", "/v1/classes/{name}"),
    ("GET", "/v1/model"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


# Invalid data is generated where the document constrains something (query parameters, bodies); an operation
# without parameters or with a free-form string path parameter has no invalid form.
CONSTRAINED = {("POST", "/v1/classify"), ("POST", "/v1/classify/batch"), ("POST", "/v1/classes")}
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if (m, p) in CONSTRAINED
]


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {mode}" for m, p, mode in RUNS])
def test_every_operation_survives_fuzzing_and_matches_its_schema(api_schema, reliability_log, method, path, mode):
    operation = api_schema[path][method]
    answered: list[int] = []

    # Hypothesis drives schemathesis's strategy directly: a fixed seed keeps CI reproducible, no example
    # database is written into the tree, and shrinking turns any failure into a minimal request.
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        response = case.call(timeout=60)
        answered.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    try:
        fuzz()
    finally:
        reliability_log.add(
            "schema fuzzing", requests=len(answered), inputs=len(answered), errors=sum(s >= 500 for s in answered)
        )
    assert answered


def test_the_document_covers_every_route(server, api_schema):
    paths = set(httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"])
    assert {
        "/v1/classify",
        "/v1/classify/batch",
        "/v1/classes",
        "/v1/classes/{name}",
        "/v1/model",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths
    operations = [op for op in api_schema.get_all_operations()]
    assert len(operations) >= 9


def test_fuzzing_left_the_server_healthy_and_never_5xx(server):
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        seen = set()
        for family in text_string_to_metric_families(c.get("/metrics").text):
            if family.name == "vlltr_request_duration_seconds":
                seen |= {
                    (s.labels["route"], s.labels["status"])
                    for s in family.samples
                    if s.name.endswith("_count") and s.value > 0
                }
    assert {pair for pair in seen if pair[1].startswith("5")} <= {("/readyz", "503")}, seen
    assert server.alive()
