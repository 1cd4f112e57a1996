"""Class text: prompt templates, Wikipedia-style description files, sentence splitting and tokenisation.

A class's sentence pool is the prompt templates filled with its name followed by the sentences of its
description file (`cfg.text_dir/cfg.text_pattern`). Description files are MediaWiki-flavoured plain text:
lines before the first heading are the summary; a line starting with `==` opens a section named by the
heading text; sections named in `cfg.drop_sections` are skipped; blank lines are ignored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from vlltr.errors import DataError
from vlltr.model.runtime.prompts import SIMPLE_TEMPLATES
from vlltr.training.config import DataCfg

log = logging.getLogger(__name__)

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation, in CLIP's order.
CLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"clip80": CLIP_TEMPLATES, "simple": SIMPLE_TEMPLATES, "none": ()}
DEFAULT_DROP_SECTIONS: tuple[str, ...] = tuple(DataCfg().drop_sections)

# Words whose trailing period does not end a sentence (compared lower-case, without the period).
ABBREVIATIONS = frozenset(
    {
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "vs",
        "approx",
        "ca",
        "cf",
        "fig",
        "figs",
        "vol",
        "pp",
        "eds",
        "inc",
        "ltd",
        "corp",
        "dept",
        "lt",
        "col",
        "sgt",
        "capt",
        "rev",
        "hon",
        "jan",
        "feb",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "sp",
        "spp",
        "subsp",
        "var",
        "syn",
        "fam",
        "al",
        "resp",
        "esp",
        "incl",
    }
)
# Sentence end: . ? or ! (plus closing quotes/brackets), then whitespace or directly a capital letter.
_BOUNDARY = re.compile(r"[.?!][\"')\]]*(?:\s+|(?=[A-Z]))")
_DOTTED_ABBREVIATION = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]?$")  # e.g, i.e, U.S
_INITIAL = re.compile(r"^[A-Z]$")  # "J. R. R. Tolkien", "P. leo"
_TEXT_SENTINEL = "The quick brown fox jumps over the lazy dog, 1234567890!"


def templates_for(kind: str) -> tuple[str, ...]:
    """The template set named by `DataCfg.templates` (`clip80`, `simple`, `none`)."""
    try:
        return TEMPLATE_SETS[kind]
    except KeyError:
        raise DataError(f"unknown template set {kind!r}; known: {sorted(TEMPLATE_SETS)}") from None


def parse_wiki_text(text: str, drop_sections: Iterable[str]) -> str:
    """The summary plus every section not in `drop_sections` (compared case-insensitively), one line each.

    Heading lines (starting with `==`, any level) are removed; a heading opens a new section, so a
    subsection of a dropped section is kept, as in the original corpus reader. Blank lines are dropped.
    """
    dropped = {s.strip().lower() for s in drop_sections}
    keep = True
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("=="):
            keep = stripped.strip("=").strip().lower() not in dropped
            continue
        if keep and stripped:
            out.append(stripped)
    return "\n".join(out)


def _is_abbreviation(prefix: str) -> bool:
    # `prefix` is the text up to (not including) the period of a candidate boundary.
    word = prefix.rsplit(None, 1)[-1] if prefix.strip() else ""
    word = word.lstrip("(\"'[")
    if not word:
        return False
    return word.lower() in ABBREVIATIONS or bool(_DOTTED_ABBREVIATION.match(word)) or bool(_INITIAL.match(word))


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, stripped, empties dropped.

    A sentence ends at `.`, `?` or `!` followed by whitespace or a capital letter, except after an
    abbreviation (`e.g.`, `i.e.`, `U.S.`, an initial like `J.`, or a word in :data:`ABBREVIATIONS` such as
    `Dr.`, `St.`, `approx.`). A line break always ends a sentence: description files put paragraphs and list
    items on separate lines, and a list item without a final period must not swallow the next line.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _BOUNDARY.finditer(line):
            if match.group(0)[0] == "." and _is_abbreviation(line[start : match.start()]):
                continue
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def class_sentences(
    name: str,
    raw_text: str | None,
    templates: Sequence[str],
    drop_sections: Iterable[str] = DEFAULT_DROP_SECTIONS,
) -> list[str]:
    """A class's sentence pool: each template filled with `name`, then the description's sentences.

    The original filled templates with `name + " "` ("a photo of a tench ."); CLIP's BPE splits punctuation
    from words, so both spellings give the same tokens and the plain one is used.
    """
    filled = [t.format(name) for t in templates]
    wiki = split_sentences(parse_wiki_text(raw_text, drop_sections)) if raw_text else []
    return filled + wiki


def read_description(path: Path) -> str:
    """A description file as text: UTF-8, then GBK (the published corpora mix both), then UTF-8 with
    replacement characters for undecodable bytes (logged)."""
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "gbk"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    log.warning("%s is neither UTF-8 nor GBK; undecodable bytes replaced", path)
    return data.decode("utf-8", errors="replace")


def description_path(cfg: DataCfg, class_id: int, class_name: str) -> Path:
    """Where class `class_id`'s description file lives (`{id}` and `{name}` in `cfg.text_pattern`)."""
    try:
        rel = cfg.text_pattern.format(id=class_id, name=class_name)
    except (KeyError, IndexError) as exc:
        raise DataError(f"text_pattern {cfg.text_pattern!r} may only use {{id}} and {{name}}: {exc}") from exc
    return Path(cfg.root) / cfg.text_dir / rel


def load_class_texts(cfg: DataCfg, class_names: list[str], class_ids: list[int]) -> list[list[str]]:
    """One sentence pool per class of `class_ids`, in that order (see :func:`class_sentences`).

    Raises:
        DataError: naming the class, when it has no description file and `cfg.templates` is `none`, or
            when its pool is empty.
    """
    templates = templates_for(cfg.templates)
    pools: list[list[str]] = []
    missing: list[int] = []
    for cid in class_ids:
        if not 0 <= cid < len(class_names):
            raise DataError(f"class id {cid} is outside the {len(class_names)} class names")
        name = class_names[cid]
        path = description_path(cfg, cid, name)
        if path.is_file():
            raw = read_description(path)
        elif not templates:
            raise DataError(f"class {cid} ({name!r}) has no description file {str(path)!r} and templates are 'none'")
        else:
            raw = None
            missing.append(cid)
        pool = class_sentences(name, raw, templates, cfg.drop_sections)
        if not pool:
            raise DataError(f"class {cid} ({name!r}) has no sentences (description file {str(path)!r} is empty)")
        pools.append(pool)
    if missing:
        log.warning(
            "%d class(es) have no description file and use templates only, first: %s", len(missing), missing[:5]
        )
    return pools


def _tokenizer_fingerprint(tokenizer: Callable[[list[str]], torch.Tensor]) -> str:
    # Class name and context length identify the tokenizer family; the ids of a fixed probe sentence tell
    # apart two tokenizers of one class with different vocabularies.
    cls = type(tokenizer)
    probe = tokenizer([_TEXT_SENTINEL])
    return f"{cls.__module__}.{cls.__qualname__}|{getattr(tokenizer, 'context_length', '')}|{probe.tolist()}"


def text_cache_key(sentences: list[list[str]], tokenizer: Callable[[list[str]], torch.Tensor]) -> str:
    """sha256 over the tokenizer's identity and every sentence with its class boundaries."""
    h = hashlib.sha256()
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for pool in sentences:
        h.update(f"\x1e{len(pool)}".encode())
        for s in pool:
            h.update(b"\x1f" + s.encode("utf-8", errors="surrogatepass"))
    return h.hexdigest()


def tokenize_class_texts(
    sentences: list[list[str]],
    tokenizer: Callable[[list[str]], torch.Tensor],
    cache_dir: Path | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Tokenise every class's sentences into one `[N, L]` int64 tensor plus class offsets `[C+1]`.

    Class `c`'s sentences are rows `offsets[c]:offsets[c+1]`. With `cache_dir`, the result is stored in
    `cache_dir/text-tokens-<sha256>.npz`, keyed by the tokenizer and the sentences themselves (never by a
    dataset name, so edited text can never be served from a stale cache).

    Raises:
        DataError: a class with no sentences.
    """
    for c, pool in enumerate(sentences):
        if not pool:
            raise DataError(f"class index {c} has no sentences to tokenize")
    counts = np.asarray([len(p) for p in sentences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"text-tokens-{text_cache_key(sentences, tokenizer)}.npz"
        if path.is_file():
            try:
                with np.load(path) as cached:
                    tokens, cached_offsets = cached["tokens"], cached["offsets"]
                if np.array_equal(cached_offsets, offsets):
                    log.info("text tokens loaded from cache %s", path)
                    return torch.from_numpy(tokens.astype(np.int64)), offsets
            except (OSError, KeyError, ValueError) as exc:
                log.warning("ignoring unreadable text token cache %s: %s", path, exc)
    flat = [s for pool in sentences for s in pool]
    tokens_t = tokenizer(flat).to(torch.long)
    if path is not None:
        _save_npz_atomic(path, tokens=tokens_t.numpy(), offsets=offsets)
    return tokens_t, offsets


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub: a **dict might bind allow_pickle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
