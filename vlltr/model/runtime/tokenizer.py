"""open_clip's CLIP tokenizer without torch: Hugging Face `tokenizers` plus the same text cleaning.

open_clip's `SimpleTokenizer` (clean="lower") does, per text:
1. `ftfy.fix_text`, `html.unescape` twice, strip; collapse whitespace runs (`str.split`); lower-case;
2. split with the regex `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
   (case-insensitive), dropping what no alternative matches (whitespace);
3. map each piece's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table) and apply byte-level
   BPE whose word-final symbols carry a `</w>` suffix; the literal strings `<start_of_text>` and
   `<end_of_text>` are their special ids;
4. `[SOT] + ids + [EOT]`, truncated to the context length `L` with EOT forced into the last slot, zero padded.

Step 1 runs here in Python (ftfy is a small pure-Python package), steps 2-3 run in `tokenizers` from the bundle's
`tokenizer.json` (built by :func:`build_tokenizer_json` from open_clip's own vocabulary file), step 4 here.
A piece that is a special-token string is mapped to its id here, exactly where open_clip's regex finds one.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# open_clip's pattern; the case-insensitive flag moves into the pattern for the Rust regex engine.
SPLIT_PATTERN = r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# open_clip keeps merges[1 : 49152 - 256 - 2 + 1] of the vocabulary file (line 0 is a version header).
_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges(bpe_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and merges exactly as open_clip's `SimpleTokenizer` builds them."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {_NUM_MERGES} BPE merges of two symbols each")
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges  # type: ignore[return-value]


def build_tokenizer_json(bpe_path: str | Path, out_path: str | Path) -> dict[str, int]:
    """Write a `tokenizers` file reproducing open_clip's BPE from its `bpe_simple_vocab_16e6.txt.gz`.

    Returns the special ids `{"sot_id", "eot_id"}` (49406, 49407 for the standard vocabulary).
    """
    vocab, merges = clip_vocab_and_merges(bpe_path)
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.save(str(out_path))
    return {"sot_id": vocab[SOT_TOKEN], "eot_id": vocab[EOT_TOKEN]}


def clean_text(text: str) -> str:
    """open_clip's `clean="lower"`: ftfy, double html unescape, whitespace collapse, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


@dataclass(frozen=True)
class TextSpec:
    """The manifest's `text` section."""

    context_length: int
    sot_id: int
    eot_id: int
    pad_id: int = 0
    lowercase: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length,
            "sot_id": self.sot_id,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TextSpec:
        if not isinstance(values, Mapping):
            raise ValueError(f"text section must be an object, got {type(values).__name__}")
        missing = [k for k in ("context_length", "sot_id", "eot_id") if k not in values]
        if missing:
            raise ValueError(f"text section lacks {missing}")
        if values.get("lowercase", True) is not True:
            raise ValueError("text lowercase=false is not supported (open_clip's CLIP tokenizer lower-cases)")
        spec = cls(
            int(values["context_length"]),
            int(values["sot_id"]),
            int(values["eot_id"]),
            int(values.get("pad_id", 0)),
            True,
        )
        if spec.context_length < 2:
            raise ValueError(f"text context_length must be at least 2, got {spec.context_length}")
        return spec


class ClipTokenizer:
    """Text -> `[N, L]` int64 token ids, identical to open_clip's tokenizer for the CLIP BPE."""

    def __init__(self, tokenizer_json: str | Path, spec: TextSpec) -> None:
        self.spec = spec
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._special = {SOT_TOKEN: spec.sot_id, EOT_TOKEN: spec.eot_id}
        for name, expected in self._special.items():
            found = self._tok.get_vocab().get(name)
            if found != expected:
                raise ValueError(f"{tokenizer_json}: {name} has id {found}, the manifest says {expected}")

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and untruncated."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids of several texts, without SOT/EOT and untruncated."""
        cleaned = [clean_text(t) for t in texts]
        encodings = self._tok.encode_batch(cleaned, add_special_tokens=False)
        out = []
        for text, enc in zip(cleaned, encodings):
            if SOT_TOKEN in text or EOT_TOKEN in text:
                out.append(self._with_specials(text, enc))
            else:
                out.append(list(enc.ids))
        return out

    def _with_specials(self, text: str, enc: Any) -> list[int]:
        # A pre-token that spells a special token is one id in open_clip; regroup the BPE ids by pre-token.
        ids: list[int] = []
        group: list[int] = []
        span = [0, 0]
        current = None

        def flush() -> None:
            piece = text[span[0] : span[1]]
            ids.extend([self._special[piece]] if piece in self._special else group)

        for tid, word, (start, end) in zip(enc.ids, enc.word_ids, enc.offsets):
            if word != current:
                if current is not None:
                    flush()
                current, group, span = word, [], [start, end]
            group.append(tid)
            span[1] = max(span[1], end)
        if current is not None:
            flush()
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """`[N, L]` int64: SOT, ids, EOT, zeros; over-long texts keep SOT, the first L-2 ids, EOT."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.spec.context_length
        result = np.full((len(texts), length), self.spec.pad_id, dtype=np.int64)
        for i, ids in enumerate(self.encode_many(texts)):
            tokens = [self.spec.sot_id] + ids + [self.spec.eot_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.spec.eot_id
            result[i, : len(tokens)] = tokens
        return result


def load_tokenizer(tokenizer_json: str | Path, text_section: Mapping[str, Any]) -> ClipTokenizer:
    """The tokenizer of a bundle from its `tokenizer.json` and the manifest's `text` section."""
    return ClipTokenizer(tokenizer_json, TextSpec.from_dict(text_section))
