"""The error model: one leaf module of domain errors with stable codes, and one table at the HTTP edge.

The codes clients read and the status each is answered with are a published contract; these tests pin them,
check that every domain error of the serving path has an answer, and that a domain error the table does not
know (a server-side fault such as a bad bundle) is a generic 500 that shows nothing of it.
"""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from support.paths import REPO
from vlltr import errors
from vlltr.errors import VlltrError, all_error_classes
from vlltr.service.api.errors import HTTP_ERRORS, ApiError, answer_for, install_error_handlers
from vlltr.service.app import RequestMiddleware
from vlltr.service.metrics import REJECT_REASONS, Metrics

# code -> (status, Retry-After?) as clients have seen them since v1.
PUBLISHED = {
    "bad_image": (400, False),
    "unsupported_type": (415, False),
    "too_large": (413, False),
    "invalid": (422, False),
    "unauthorized": (401, False),
    "forbidden": (403, False),
    "queue_full": (503, True),
    "not_found": (404, False),
    "conflict": (409, False),
    "method_not_allowed": (405, False),
    "not_ready": (503, True),
    "store_unavailable": (503, True),
    "inference_failed": (503, True),
    "internal": (500, False),
    "timeout": (408, False),  # a stalled request head or body
    "too_many_connections": (503, True),  # the server's connection bound
    "bad_request": (400, False),  # the HTTP parser's refusal of a request that is not HTTP
}

CODES = {
    "VlltrError": "error",
    "ImageDecodeError": "bad_image",
    "UnsupportedImageTypeError": "unsupported_type",
    "ImageTooLargeError": "too_large",
    "ClassValidationError": "invalid",
    "ClassConflictError": "conflict",
    "TrainedClassError": "conflict",
    "ClassNotFoundError": "not_found",
    "StoreUnavailableError": "store_unavailable",
    "StoredRecordError": "bad_record",
    "ServiceRequestError": "service_request_failed",
    "QueueFullError": "queue_full",
    "NotReadyError": "not_ready",
    "InferenceFailedError": "inference_failed",
    "BundleError": "bad_bundle",
    "ProviderError": "provider_unavailable",
    "DemoBundleError": "demo_bundle_unavailable",
    "DataError": "bad_data",
    "ConfigError": "bad_config",
    "UnknownArchitectureError": "unknown_architecture",
    "MissingFileError": "missing_file",
    "ExportError": "export_failed",
}
# What the service answers for; the rest are failures of the command line (training, export, start-up).
SERVED = {
    "ImageDecodeError",
    "UnsupportedImageTypeError",
    "ImageTooLargeError",
    "ClassValidationError",
    "ClassConflictError",
    "TrainedClassError",
    "ClassNotFoundError",
    "StoreUnavailableError",
    "QueueFullError",
    "NotReadyError",
    "InferenceFailedError",
}


def test_every_domain_error_has_its_stable_code():
    assert {cls.__name__: cls.code for cls in all_error_classes()} == CODES


def test_the_table_answers_every_published_code_as_before():
    assert {code: (m.status, m.retry_after) for code, m in HTTP_ERRORS.items()} == PUBLISHED
    # Every reason counted under vlltr_requests_rejected_total is one the metric was created with.
    assert {m.reject_reason for m in HTTP_ERRORS.values()} - {None} == set(REJECT_REASONS)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_each_served_error_has_one_answer(name):
    cls = getattr(errors, name)
    answer = answer_for(cls("why it failed"), retry_after_s=7)
    assert answer is not None and answer.code == cls.code and answer.message == "why it failed"
    status, retry = PUBLISHED[cls.code]
    assert answer.status == status
    assert answer.headers == ({"Retry-After": "7"} if retry else {})


@pytest.mark.parametrize("name", sorted(set(CODES) - SERVED))
def test_errors_of_other_rooms_have_no_http_answer(name):
    assert answer_for(getattr(errors, name)("x"), retry_after_s=1) is None


def test_api_error_answers_with_its_own_status_and_headers():
    answer = answer_for(ApiError(401, "unauthorized", "token?", {"WWW-Authenticate": "Bearer"}), 1)
    assert (answer.status, answer.code, answer.headers) == (401, "unauthorized", {"WWW-Authenticate": "Bearer"})
    assert answer_for(ValueError("not ours"), 1) is None


def test_the_errors_module_imports_the_standard_library_only():
    tree = ast.parse((REPO / "vlltr" / "errors.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "typing"}


def test_no_error_class_is_defined_outside_the_errors_module():
    # One definition per failure: every other module imports its errors from vlltr.errors.
    stray = []
    for path in sorted((REPO / "vlltr").rglob("*.py")):
        if path == REPO / "vlltr" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                stray.append(f"{path.relative_to(REPO)}:{node.name}")
    # ApiError lives at the HTTP edge on purpose: failures that exist only there (multipart, limits, auth).
    assert stray == ["vlltr/service/api/errors.py:ApiError"]


def _app() -> FastAPI:
    app = FastAPI()
    app.state.settings = SimpleNamespace(retry_after_s=3)
    app.state.metrics = Metrics()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    async def raise_it(name: str) -> None:
        raise getattr(errors, name)(f"{name} happened")

    app.add_middleware(RequestMiddleware, metrics=app.state.metrics)
    return app


def test_handlers_answer_domain_errors_with_the_table():
    with TestClient(_app()) as client:
        r = client.get("/raise/QueueFullError")
        assert r.status_code == 503 and r.headers["Retry-After"] == "3"
        assert r.json() == {"error": {"code": "queue_full", "message": "QueueFullError happened"}}
        r = client.get("/raise/ClassNotFoundError")
        assert r.status_code == 404 and "Retry-After" not in r.headers
        assert r.json()["error"]["code"] == "not_found"
        r = client.get("/raise/UnsupportedImageTypeError")  # a subclass of ImageDecodeError, with its own code
        assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_type")


def test_a_server_side_domain_error_is_a_generic_500(caplog):
    with TestClient(_app(), raise_server_exceptions=False) as client:
        r = client.get("/raise/BundleError")
    assert r.status_code == 500
    body = r.json()["error"]
    assert body["code"] == "internal" and "BundleError" not in body["message"]
    assert "BundleError happened" in caplog.text  # logged for the operator, with the request id


def test_domain_errors_keep_their_builtin_bases():
    # Callers that caught the built-in type before the classes moved still catch them.
    assert issubclass(errors.DataError, ValueError) and issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.UnknownArchitectureError, errors.ConfigError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.ExportError, RuntimeError) and issubclass(errors.ClassNotFoundError, LookupError)
    assert str(errors.ClassNotFoundError("no added class named 'x'")) == "no added class named 'x'"
    assert isinstance(errors.VlltrError("m").message, str)
    assert issubclass(errors.UnsupportedImageTypeError, errors.ImageDecodeError)
    assert all(issubclass(cls, VlltrError) for cls in all_error_classes())
