"""The torch-free tokenizer's own checks: special ids and the text spec (no torch).
tests/unit/networks/test_tokenizer_vs_open_clip.py checks its ids against open_clip's."""

from __future__ import annotations

import pytest

from vlltr.model.runtime.tokenizer import ClipTokenizer, TextSpec


def test_wrong_special_ids_are_refused(bundle_v1):
    # The bundle's tokenizer.json is what build_tokenizer_json made of open_clip's vocabulary at export time.
    with pytest.raises(ValueError, match="start_of_text"):
        ClipTokenizer(bundle_v1 / "tokenizer.json", TextSpec(77, 1, 49407))
    assert ClipTokenizer(bundle_v1 / "tokenizer.json", TextSpec(77, 49406, 49407))(["a dog"]).shape == (1, 77)


def test_text_spec_validation():
    with pytest.raises(ValueError, match="lacks"):
        TextSpec.from_dict({"context_length": 77})
    with pytest.raises(ValueError, match="lowercase"):
        TextSpec.from_dict({"context_length": 77, "sot_id": 1, "eot_id": 2, "lowercase": False})
    spec = TextSpec(77, 49406, 49407)
    assert TextSpec.from_dict(spec.to_dict()) == spec
