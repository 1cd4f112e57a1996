"""`POST /v1/classify` reads a raw image body for every format the service decodes, and its OpenAPI document says
so, beside multipart and JSON with base64 (the answers over HTTP: tests/integration/test_raw_image_body.py and
tests/integration/test_classify_options.py)."""

from __future__ import annotations

from vlltr.model.runtime.preprocess import SUPPORTED_FORMATS
from vlltr.service.api.classify import MULTIPART, RAW_IMAGE_TYPES
from vlltr.service.api.inputs import JSON
from vlltr.service.app import create_app
from vlltr.service.settings import Settings


def test_every_decoded_format_has_its_raw_content_type():
    assert sorted(RAW_IMAGE_TYPES.values()) == sorted(SUPPORTED_FORMATS)
    assert all(t.startswith("image/") and t == t.lower() for t in RAW_IMAGE_TYPES)


def test_the_document_lists_multipart_and_each_raw_type(tmp_path):
    spec = create_app(Settings(bundle=tmp_path / "unused", cache_dir=tmp_path)).openapi()
    operation = spec["paths"]["/v1/classify"]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {MULTIPART, JSON, *RAW_IMAGE_TYPES}
    assert content[JSON]["schema"]["required"] == ["image"]
    assert content[MULTIPART]["schema"]["required"] == ["file"]
    for media_type in RAW_IMAGE_TYPES:
        assert content[media_type]["schema"] == {"type": "string", "format": "binary", "minLength": 1}
    assert {"408", "413", "415"} <= set(operation["responses"])
    # The batch endpoint reads multipart or JSON (base64 images), not raw bodies.
    batch = spec["paths"]["/v1/classify/batch"]["post"]["requestBody"]["content"]
    assert set(batch) == {MULTIPART, JSON}
    assert batch[JSON]["schema"]["required"] == ["images"]
    assert "$ref" not in str(batch[JSON]["schema"])  # inlined: a request body cannot point into `$defs`
    # The answers carry examples, one of them explained.
    examples = operation["responses"]["200"]["content"][JSON]["examples"]
    assert examples["explain"]["value"]["predictions"][0]["explanation"]["anchors"]
