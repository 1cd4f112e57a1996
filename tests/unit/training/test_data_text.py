"""Class text: templates, wiki parsing, sentence splitting, per-class pools and the token cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip import zero_shot_metadata

from vlltr.model.networks.factory import get_tokenizer
from vlltr.training.config import DataCfg
from vlltr.training.data.errors import DataError
from vlltr.training.data.text import (
    CLIP_TEMPLATES,
    SIMPLE_TEMPLATES,
    class_sentences,
    load_class_texts,
    parse_wiki_text,
    split_sentences,
    tokenize_class_texts,
)

WIKI = """The tench is a fish. It lives in lakes.

== Description ==
It has a thick, slimy skin, e.g. in winter.
=== Colour ===
It is olive green.

== References ==
Smith, J. Fishes. London.
== External links ==
* www.example.org
"""


def test_templates_are_clips() -> None:
    assert len(CLIP_TEMPLATES) == 80
    assert list(CLIP_TEMPLATES) == [t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert list(SIMPLE_TEMPLATES) == [t("{}") for t in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]


def test_parse_wiki_text_drops_sections_and_headings() -> None:
    text = parse_wiki_text(WIKI, ["References", "external links"])
    assert text.splitlines() == [
        "The tench is a fish. It lives in lakes.",
        "It has a thick, slimy skin, e.g. in winter.",
        "It is olive green.",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two? Three! Four", ["One.", "Two?", "Three!", "Four"]),
        ("Seen e.g. here and i.e. there. Next.", ["Seen e.g. here and i.e. there.", "Next."]),
        (
            "Named by Dr. Smith near St. Ives, approx. 5 km away. Done.",
            ["Named by Dr. Smith near St. Ives, approx. 5 km away.", "Done."],
        ),
        ("J. R. R. Tolkien wrote it. P. leo is a cat.", ["J. R. R. Tolkien wrote it.", "P. leo is a cat."]),
        ("It weighs 3.5 kg. It is big.Really.", ["It weighs 3.5 kg.", "It is big.", "Really."]),
        ("First line without period\nSecond line.", ["First line without period", "Second line."]),
        ("  \n \n", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_class_sentences_templates_then_wiki() -> None:
    pool = class_sentences("tench", WIKI, SIMPLE_TEMPLATES)
    assert pool[:2] == ["itap of a tench.", "a bad photo of the tench."]
    assert pool[len(SIMPLE_TEMPLATES) :] == [
        "The tench is a fish.",
        "It lives in lakes.",
        "It has a thick, slimy skin, e.g. in winter.",
        "It is olive green.",
    ]


def _corpus(tmp_path: Path) -> DataCfg:
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "desc_0.txt").write_text(WIKI, encoding="utf-8")
    (tmp_path / "wiki" / "desc_1.txt").write_bytes("Le poisson rouge. Il est très joli.".encode("gbk"))
    return DataCfg(root=str(tmp_path), text_dir="wiki", templates="simple")


def test_load_class_texts_in_class_id_order(tmp_path: Path) -> None:
    cfg = _corpus(tmp_path)
    pools = load_class_texts(cfg, ["tench", "goldfish", "shark"], [1, 0, 2])
    n = len(SIMPLE_TEMPLATES)
    assert pools[0][0] == "itap of a goldfish." and pools[0][n:] == ["Le poisson rouge.", "Il est très joli."]
    assert pools[1][n] == "The tench is a fish."
    assert len(pools[2]) == n  # no description file: templates only


def test_load_class_texts_errors_name_the_class(tmp_path: Path) -> None:
    cfg = _corpus(tmp_path)
    cfg.templates = "none"
    with pytest.raises(DataError, match="class 2 \\('shark'\\) has no description file"):
        load_class_texts(cfg, ["tench", "goldfish", "shark"], [0, 2])
    (tmp_path / "wiki" / "desc_2.txt").write_text("== References ==\nNothing here.\n")
    with pytest.raises(DataError, match="class 2 \\('shark'\\) has no sentences"):
        load_class_texts(cfg, ["tench", "goldfish", "shark"], [2])


def test_text_pattern_with_name(tmp_path: Path) -> None:
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "great white shark.txt").write_text("A big fish.")
    cfg = DataCfg(root=str(tmp_path), text_pattern="{name}.txt", templates="none")
    assert load_class_texts(cfg, ["great white shark"], [0]) == [["A big fish."]]


def test_tokenize_and_cache(tmp_path: Path) -> None:
    tokenizer = get_tokenizer("vlltr-tiny-vit")
    sentences = [["a photo of a tench.", "It lives in lakes."], ["a photo of a goldfish."]]
    tokens, offsets = tokenize_class_texts(sentences, tokenizer, tmp_path)
    assert tokens.dtype == torch.long and tokens.shape == (3, tokenizer.context_length)
    assert offsets.tolist() == [0, 2, 3]
    assert torch.equal(tokens, tokenizer([s for pool in sentences for s in pool]))
    entries = sorted(tmp_path.glob("text-tokens-*.npz"))
    assert len(entries) == 1
    again, offsets2 = tokenize_class_texts(sentences, tokenizer, tmp_path)
    assert torch.equal(again, tokens) and np.array_equal(offsets2, offsets)
    assert sorted(tmp_path.glob("text-tokens-*.npz")) == entries

    # Changed text, or the same sentences split differently between classes, is a different entry.
    edited = [["a photo of a tench.", "It lives in rivers."], ["a photo of a goldfish."]]
    new_tokens, _ = tokenize_class_texts(edited, tokenizer, tmp_path)
    assert not torch.equal(new_tokens, tokens)
    regrouped = [["a photo of a tench."], ["It lives in lakes.", "a photo of a goldfish."]]
    _, new_offsets = tokenize_class_texts(regrouped, tokenizer, tmp_path)
    assert new_offsets.tolist() == [0, 1, 3]
    assert len(list(tmp_path.glob("text-tokens-*.npz"))) == 3


def test_tokenize_long_sentence_is_truncated_with_eot() -> None:
    tokenizer = get_tokenizer("vlltr-tiny-vit")
    tokens, _ = tokenize_class_texts([[" ".join(["word"] * 200)]], tokenizer, None)
    assert tokens.shape[1] == tokenizer.context_length
    assert int(tokens[0, -1]) == tokenizer.eot_token_id and int(tokens[0, 0]) == tokenizer.sot_token_id


def test_tokenize_rejects_empty_class() -> None:
    with pytest.raises(DataError, match="class index 1"):
        tokenize_class_texts([["a."], []], get_tokenizer("vlltr-tiny-vit"), None)
