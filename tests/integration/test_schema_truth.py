"""The OpenAPI document states the limits the service enforces, so schema-valid requests are accepted.

schemathesis (its command line, as a user runs it) generates schema-valid requests for the operations that take
bodies and must not warn "schema validation mismatch" (an operation that rejects what its schema allows), with
its default checks bar `positive_data_acceptance`: a few rules a pattern cannot state portably (invisible or
unassigned characters in a name, a subset filter together with labels in the query) are refused with 422 as
their descriptions say. The document's limits follow the settings the server runs with.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from support.paths import PYTHON

TOKEN = "schema-truth-token"
MAX_TOP_K = 17
MAX_BATCH_FILES = 5
MAX_DESCRIPTIONS = 9
MAX_DESCRIPTION_CHARS = 300


@pytest.fixture(scope="module")
def server(bundle_v1, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("schema-truth")
    env = {
        "VLLTR_ADMIN_TOKEN": TOKEN,
        "VLLTR_CLASS_STORE": str(workdir / "classes.json"),
        "VLLTR_MAX_TOP_K": str(MAX_TOP_K),
        "VLLTR_MAX_BATCH_FILES": str(MAX_BATCH_FILES),
        "VLLTR_MAX_DESCRIPTIONS": str(MAX_DESCRIPTIONS),
        "VLLTR_MAX_DESCRIPTION_CHARS": str(MAX_DESCRIPTION_CHARS),
    }
    srv = server_factory(env=env, args=["--bundle", str(bundle_v1)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def document(server) -> dict:
    r = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def _param(operation: dict, name: str) -> dict:
    return next(p for p in operation["parameters"] if p["name"] == name)


def test_the_document_carries_the_running_limits(document):
    paths = document["paths"]
    for path in ("/v1/classify", "/v1/classify/batch"):
        operation = paths[path]["post"]
        assert _param(operation, "top_k")["schema"]["maximum"] == MAX_TOP_K
        assert operation["requestBody"]["content"]["application/json"]["schema"]["properties"]["top_k"]
    batch = paths["/v1/classify/batch"]["post"]["requestBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] == MAX_BATCH_FILES
    assert batch["application/json"]["schema"]["properties"]["images"]["maxItems"] == MAX_BATCH_FILES
    assert "image/" in batch["multipart/form-data"]["encoding"]["files"]["contentType"]
    create = paths["/v1/classes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name, descriptions = create["properties"]["name"], create["properties"]["descriptions"]
    assert name["maxLength"] == 100 and name["pattern"]
    assert descriptions["maxItems"] == MAX_DESCRIPTIONS and descriptions["minItems"] == 1
    assert descriptions["items"]["maxLength"] == MAX_DESCRIPTION_CHARS and descriptions["items"]["pattern"]
    assert create["additionalProperties"] is False


def test_every_operation_with_a_body_carries_an_example(document):
    for path, method in (("/v1/classify", "post"), ("/v1/classify/batch", "post"), ("/v1/classes", "post")):
        schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        (example,) = schema["examples"][:1]
        assert example, path
    delete = _param(document["paths"]["/v1/classes/{name}"]["delete"], "name")
    assert delete["example"]


def test_the_examples_are_accepted(server, document):
    paths = document["paths"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as client:
        for path in ("/v1/classify", "/v1/classify/batch", "/v1/classes"):
            example = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["examples"][0]
            r = client.post(path, json=example)
            assert r.status_code in (200, 201), (path, r.text)
        assert client.delete(f"/v1/classes/{_param(paths['/v1/classes/{name}']['delete'], 'name')['example']}")


def test_schemathesis_reports_no_schema_validation_mismatch(server, tmp_path):
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--mode",
            "positive",
            "--phases",
            "examples,fuzzing",
            "--max-examples",
            "40",
            "--seed",
            "1",
            "--include-path-regex",
            "^/v1/(classify|classes)",
            "--exclude-path-regex",
            "import|export|bulk",
            "--exclude-checks",
            "positive_data_acceptance",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # schemathesis may write reports and caches where it runs
        check=False,
    )
    output = done.stdout + done.stderr
    assert "validation mismatch" not in output.lower(), output[-4000:]
    assert done.returncode == 0, output[-4000:]
    assert "5 passed" in output or "No issues found" in output, output[-4000:]
