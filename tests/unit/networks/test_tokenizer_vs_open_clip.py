"""The torch-free tokenizer (vlltr.model.runtime.tokenizer) gives exactly open_clip's token ids (acceptance 2)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from vlltr.model.runtime.tokenizer import ClipTokenizer, TextSpec, build_tokenizer_json, clean_text

WORDS = [
    "photo",
    "dog",
    "Cat",
    "BIRD",
    "a",
    "the",
    "of",
    "with",
    "small",
    "large-ish",
    "red",
    "bird's",
    "it's",
    "they'll",
    "we're",
    "I'd",
    "you've",
    "I'm",
    "don't",
    "café",
    "naïve",
    "résumé",
    "Ångström",
    "straße",
    "İstanbul",
    "ΣΊΣΥΦΟΣ",
    "Москва",
    "日本語",
    "中文字符",
    "한국어",
    "ไทย",
    "عربى",
    "עברית",
    "हिन्दी",
    "😀",
    "👍🏽",
    "🇫🇷",
    "❤️",
    "🐕‍🦺",
    "ﬁsh",
    "Ｆｕｌｌｗｉｄｔｈ",
    "x²",
    "½",
    "①",
    "Ⅻ",
    "3.14159",
    "1,000,000",
    "42",
    "2024-01-31",
    "v1.2.3",
    "e.g.",
    "U.S.A.",
    "C++",
    "#hashtag",
    "@user",
    "http://example.com/a?b=c",
    "&amp;",
    "&lt;b&gt;",
    "&quot;quoted&quot;",
    "&#39;",
    "&amp;amp;",
    "&nbsp;",
    "&eacute;",
    "<start_of_text>",
    "<end_of_text>",
    "!<end_of_text>",
    "...",
    "!!!",
    "?!",
    "—",
    "–",
    "“smart”",
    "‘quotes’",
    "«guillemets»",
    "(paren)",
    "[bracket]",
    "{brace}",
    "under_score",
    "semi;colon",
    "tab\there",
    "new\nline",
    "Ã©",
    "â€™",
    "\u200bzwsp",
    "nbsp\u00a0here",
    "\u3000ideographic",
    "mixedCASEword",
    "ALLCAPS",
    "ß",
    "Σ",
    "ς",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaa",
]
SEPARATORS = [" ", " ", " ", "  ", "\t", " \n ", "   \t  ", ", ", "; ", "\u00a0", "\r\n", ""]


def generate_sentences(n: int = 1200, seed: int = 0) -> list[str]:
    """Deterministic mix: short, long (> 77 tokens), empty, whitespace-only, unicode-heavy, entity-heavy."""
    rng = random.Random(seed)
    out = ["", " ", "\n\n", "\t \t", "a", "A photo of a dog.", "&amp;" * 30, "😀" * 100, "日本" * 200]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.15:
            length = rng.randint(60, 160)  # long: far over the context length
        elif kind < 0.2:
            length = rng.randint(0, 2)
        else:
            length = rng.randint(3, 25)
        parts = []
        for _ in range(length):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(SEPARATORS))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = text.upper() if rng.random() < 0.5 else text.title()
        if rng.random() < 0.1:
            text = "  " + text + "   \n"
        out.append(text)
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    ids = build_tokenizer_json(default_bpe(), path)
    return ClipTokenizer(path, TextSpec(77, ids["sot_id"], ids["eot_id"])), SimpleTokenizer()


def test_special_ids():
    tok = SimpleTokenizer()
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)


def test_parity_with_open_clip_on_generated_sentences(tokenizers):
    ours, reference = tokenizers
    sentences = generate_sentences()
    assert len(sentences) >= 1000
    got = ours(sentences)
    expected = reference(sentences).numpy()
    assert got.dtype == np.int64 and got.shape == (len(sentences), 77)
    mismatched = [s for s, g, e in zip(sentences, got, expected) if not np.array_equal(g, e)]
    assert not mismatched, f"{len(mismatched)} sentences differ, first: {mismatched[0]!r}"
    # The corpus really covers the hard cases.
    lengths = np.array([len(reference.encode(s)) for s in sentences])
    assert (lengths > 75).sum() >= 100, "too few over-long sentences"
    assert (lengths == 0).sum() >= 5, "too few empty sentences"
    assert sum("&" in s for s in sentences) >= 100
    assert sum(any(ord(ch) > 0x3000 for ch in s) for s in sentences) >= 300


def test_untruncated_ids_match(tokenizers):
    ours, reference = tokenizers
    for s in generate_sentences(200, seed=1):
        assert ours.encode(s) == reference.encode(s)


@pytest.mark.parametrize("length", [2, 5, 16, 77])
def test_truncation_keeps_sot_and_forces_eot(tmp_path, length):
    ids = build_tokenizer_json(default_bpe(), tmp_path / "t.json")
    ours = ClipTokenizer(tmp_path / "t.json", TextSpec(length, ids["sot_id"], ids["eot_id"]))
    reference = SimpleTokenizer(context_length=length)
    text = "one two three four five six seven eight nine ten " * 10
    got = ours([text, "dog"])
    np.testing.assert_array_equal(got, reference([text, "dog"]).numpy())
    assert got[0, 0] == 49406 and got[0, -1] == 49407
    assert (got[1, 3:] == 0).all() if length > 3 else True


def test_clean_text_is_open_clips():
    from open_clip.tokenizer import _clean_lower

    for s in generate_sentences(300, seed=2):
        assert clean_text(s) == _clean_lower(s)
