"""Schema fuzzing of the whole HTTP API from its own OpenAPI document (schemathesis), against a real server.

Every operation the document lists gets valid and invalid requests (bodies, query strings, path parameters,
headers). Each answer must not be a 5xx, must carry a status the document lists for that operation, and must
match the documented body schema, content type and headers. The class endpoints are fuzzed with the admin token
(so requests reach validation) and the auth tests cover the refusals without it.
"""

from __future__ import annotations

import email
import email.policy
from urllib.parse import parse_qs, urlsplit

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.core.mutations import Mutation, MutationChannel, OperatorKind
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.meta import (
    CaseMetadata,
    ComponentInfo,
    FuzzingPhaseData,
    GenerationInfo,
    PhaseInfo,
    TestPhase,
)
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from vlltr.service.explain import MAX_LABELS

TOKEN = "schema-fuzz-token"
EXAMPLES_PER_OPERATION = 40


def _documented_operation(case) -> dict:  # type: ignore[no-untyped-def]
    """The operation as the document states it (not schemathesis's processed copy of it)."""
    raw: dict = case.operation.schema.raw_schema
    return raw["paths"][case.operation.path][case.operation.method.lower()]


def _is_list(schema: dict) -> bool:
    return any(s.get("type") == "array" for s in schema.get("anyOf", [schema]))


def _only_negative_at(case, location) -> bool:  # type: ignore[no-untyped-def]
    """Whether schemathesis made `location` of the request invalid, and nothing else."""
    meta = case.meta
    parts = (ParameterLocation.QUERY, ParameterLocation.PATH, ParameterLocation.HEADER, ParameterLocation.COOKIE)
    others = {*parts, ParameterLocation.BODY} - {location}
    return meta.phase.data.parameter_location == location and not any(meta.is_negative_at(at) for at in others)


def _query_array_parameters(case) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """The operation's query parameters that take a list (repeat the parameter), with their schemas as the
    document states them (schemathesis's own copy folds an item's length into its pattern, `\\S` with 1 to 200
    characters becoming `^\\S{1,200}$`, which refuses every label with a space)."""
    parameters = _documented_operation(case).get("parameters", [])
    return {p["name"]: p["schema"] for p in parameters if p.get("in") == "query" and _is_list(p["schema"])}


def _received_lists_are_valid(case, response) -> bool:  # type: ignore[no-untyped-def]
    # A query string is text: whatever was generated for a list parameter (`false`, `{}`, `0`) reaches the server
    # as zero or more strings. What the server must refuse is what it received, so validate that.
    if not _only_negative_at(case, ParameterLocation.QUERY):
        return False
    data = case.meta.phase.data
    mutated = {data.parameter} if data.parameter else {m.parameter for m in data.mutations}
    arrays = _query_array_parameters(case)
    if not mutated or None in mutated or not mutated <= arrays.keys():
        return False
    received = parse_qs(urlsplit(response.request.url).query, keep_blank_values=True)
    try:
        for name in mutated:
            jsonschema.validate(received.get(name), arrays[name])
    except jsonschema.ValidationError:
        return False
    return True


def _form_schema(case) -> dict | None:  # type: ignore[no-untyped-def]
    """The document's schema of the operation's multipart/form-data body, its `$ref`s resolved."""
    raw = case.operation.schema.raw_schema
    content = _documented_operation(case).get("requestBody", {}).get("content", {})
    schema = content.get("multipart/form-data", {}).get("schema")
    while isinstance(schema, dict) and "$ref" in schema:
        target = raw
        for key in schema["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        schema = target
    return schema


def _sent_form_is_valid(case, response) -> bool:  # type: ignore[no-untyped-def]
    # A multipart body is a list of named parts: a mutation of the body object that the form encoding cannot
    # express (a property renamed or dropped along with its type) can reach the server as a valid form. Validate
    # the form that was sent: its field names, and how many parts each has, against the document's schema.
    if not _only_negative_at(case, ParameterLocation.BODY):
        return False
    sent = response.request
    ctype = sent.headers.get("Content-Type", "")
    schema = _form_schema(case)
    if not ctype.startswith("multipart/form-data") or schema is None:
        return False
    body = sent.body if isinstance(sent.body, bytes) else str(sent.body or "").encode()
    message = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body, policy=email.policy.HTTP)
    if not message.is_multipart():
        return False
    counts: dict[str, int] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        counts[str(name)] = counts.get(str(name), 0) + 1
    properties = schema.get("properties", {})
    form = {name: ["x"] * n if _is_list(properties.get(name, {})) else "x" for name, n in counts.items()}
    try:
        jsonschema.validate(form, schema)
    except jsonschema.ValidationError:
        return False
    return True


def negative_data_rejection_of_what_was_sent(ctx, response, case):  # type: ignore[no-untyped-def]
    """schemathesis's `negative_data_rejection`, less two false positives where the invalid data never reaches
    the server: a value generated for a list query parameter that the schema forbids (`false`, `{}`) arrives as
    a valid list of strings or as no parameter at all (upstream #2312, #3962), and a mutated multipart body can be
    sent as a valid form. The server is right to accept what it received when that is valid."""
    try:
        return negative_data_rejection(ctx, response, case)
    except AcceptedNegativeData:
        if _received_lists_are_valid(case, response) or _sent_form_is_valid(case, response):
            return None
        raise


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection_of_what_was_sent,
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


def _negative_case(operation, where, parameter, **request):  # type: ignore[no-untyped-def]
    """A batch request whose only invalid part, as schemathesis records it, is `parameter` in `where`."""
    mutation = Mutation(
        path=(),
        parameter_location=where,
        schema_pointer=f"/properties/{parameter}",
        channel=MutationChannel.SCHEMA,
        operator=OperatorKind.CHANGE_TYPE,
        keywords=("anyOf",),
        parameter=parameter,
        original_value=None,
        new_value=None,
    )
    meta = CaseMetadata(
        generation=GenerationInfo(time=0.0, mode=GenerationMode.NEGATIVE),
        components={where: ComponentInfo(mode=GenerationMode.NEGATIVE)},
        phase=PhaseInfo(
            name=TestPhase.FUZZING,
            data=FuzzingPhaseData(
                description=parameter,
                parameter=None,
                parameter_location=where,
                location=None,
                mutations=(mutation,),
            ),
        ),
    )
    return operation.Case(media_type="multipart/form-data", _meta=meta, **request)


def _negative_query_case(operation, query):  # type: ignore[no-untyped-def]
    return _negative_case(operation, ParameterLocation.QUERY, "labels", query=query, body={"files": [b""]})


def test_the_query_string_excuse_covers_only_lists_the_server_received_as_valid(api_schema):
    operation = api_schema["/v1/classify/batch"]["POST"]
    # `labels=false` arrives as the one-label list ["false"]: valid, so accepting it is right.
    scalar = _negative_query_case(operation, {"labels": False})
    assert _received_lists_are_valid(scalar, scalar.call(timeout=60))
    # Labels with spaces are what the document allows (an item needs one non-blank character), whatever
    # schemathesis's rewritten pattern says.
    spaced = _negative_query_case(operation, {"labels": ["a red\rthing", "{'x': 2.0}"]})
    assert _received_lists_are_valid(spaced, spaced.call(timeout=60))
    # More labels than the document allows arrive as too many labels: accepting them would be a real failure.
    too_many = _negative_query_case(operation, {"labels": [f"label {i}" for i in range(MAX_LABELS + 1)]})
    assert not _received_lists_are_valid(too_many, too_many.call(timeout=60))


def test_the_form_excuse_covers_only_forms_the_server_received_as_valid(api_schema):
    operation = api_schema["/v1/classify/batch"]["POST"]
    sent_valid = _negative_case(operation, ParameterLocation.BODY, "files", body={"files": [b"not an image"]})
    assert _sent_form_is_valid(sent_valid, sent_valid.call(timeout=60))
    limit = _form_schema(sent_valid)["properties"]["files"]["maxItems"]  # type: ignore[index]
    too_many = _negative_case(operation, ParameterLocation.BODY, "files", body={"files": [b"x"] * (limit + 1)})
    assert not _sent_form_is_valid(too_many, too_many.call(timeout=60))
    misnamed = _negative_case(operation, ParameterLocation.BODY, "files", body={"images": [b"x"]})
    assert not _sent_form_is_valid(misnamed, misnamed.call(timeout=60))


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
