"""The LGR head and the calibrated fusion in numpy: the service's scoring (docs/bundle.md, "Scoring").

It mirrors `model/networks/head.py` (`LGRHead`, `calibrated_probabilities`); tests keep the two equal.

The class table holds everything about the classes that does not depend on the image, precomputed once per
table (trained classes from the bundle, plus classes added by text at run time):
- `keys`: `W_q^T W_k LN_k(T) / sqrt(D)` as one contiguous `[C*M, D]` matrix, so the attention scores of a
  batch are one GEMM against `LN_q(f)` (`q . K = LN_q(f) . W_q^T K`);
- `anchors`: `T` as one contiguous `[C*M, D]` matrix, so `T_c f_hat` for all classes is the second GEMM;
- `gram`: `G_c = T_c T_c^T`, `[C, M, M]`, so `|a_c T_c|^2 = a_c^T G_c a_c` without building `[B, C, D]`;
- `mask_bias`: 0 where an anchor exists, -inf for padding (padding gets exactly zero attention);
- `prototypes`: each class's unit mean anchor, sketched to at most 128 dimensions (`_sketch`), which ranks
  added classes cheaply when a `Shortlist` limits exact scoring to the nearest ones (tables with many
  thousands of added classes).
Memory is about `2*C*M*D + C*M*M + C*min(D, 128)` floats; scoring runs in chunks of classes to bound the temporaries.
Tables are immutable: `with_added` returns a new table, so the service can swap tables atomically. Adding to
the newest table of a chain costs the size of what is added, not of the table: the arrays live in buffers with
spare rows (`_RowStore`), a new table writes its rows into the spare part that no older table looks at and
takes longer views of the same buffers; only when the spare rows run out are the buffers reallocated (by a
quarter more), so the copies amortise to a constant per class.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEAD_ARRAYS = (
    "ln_q_weight",
    "ln_q_bias",
    "w_q",
    "ln_k_weight",
    "ln_k_bias",
    "w_k",
    "mlp_w1",
    "mlp_b1",
    "mlp_w2",
    "mlp_b2",
)
_EPS = 1e-12
_CHUNK_ELEMENTS = 1 << 24  # B * classes * M elements per temporary while scoring (64 MiB of float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """torch.nn.LayerNorm over the last axis (biased variance)."""
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    out: np.ndarray = centred / np.sqrt(var + np.float32(eps)) * weight + bias
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; -inf entries get 0, rows that are entirely -inf are not expected."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / np.sum(e, axis=axis, keepdims=True)
    return out


@dataclass(frozen=True)
class HeadParams:
    """The LGR head's weights (float32, torch `[out, in]` layout) and its constants."""

    ln_q_weight: np.ndarray
    ln_q_bias: np.ndarray
    w_q: np.ndarray
    ln_k_weight: np.ndarray
    ln_k_bias: np.ndarray
    w_k: np.ndarray
    mlp_w1: np.ndarray
    mlp_b1: np.ndarray
    mlp_w2: np.ndarray
    mlp_b2: np.ndarray
    logit_scale: float
    ln_eps: float = 1e-5

    @property
    def embed_dim(self) -> int:
        return int(self.w_q.shape[0])

    @property
    def num_trained(self) -> int:
        return int(self.mlp_w2.shape[0])

    def validate(self) -> None:
        """Raise ValueError naming the first array whose shape does not fit the others."""
        d = self.embed_dim
        c = self.num_trained
        expected = {
            "ln_q_weight": (d,),
            "ln_q_bias": (d,),
            "w_q": (d, d),
            "ln_k_weight": (d,),
            "ln_k_bias": (d,),
            "w_k": (d, d),
            "mlp_w1": (4 * d, d),
            "mlp_b1": (4 * d,),
            "mlp_w2": (c, 4 * d),
            "mlp_b2": (c,),
        }
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"head array {name} has shape {got}, expected {shape}")
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"head array {name} holds non-finite values")
        if not math.isfinite(self.logit_scale) or self.logit_scale <= 0:
            raise ValueError(f"head logit_scale must be positive and finite, got {self.logit_scale}")

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, logit_scale: float, ln_eps: float = 1e-5) -> HeadParams:
        """Build from `head.npz`-style arrays; a missing array raises KeyError naming it."""
        missing = [k for k in HEAD_ARRAYS if k not in arrays]
        if missing:
            raise KeyError(f"head arrays missing: {missing}")
        params = cls(
            **{k: np.ascontiguousarray(arrays[k], dtype=np.float32) for k in HEAD_ARRAYS},
            logit_scale=float(logit_scale),
            ln_eps=float(ln_eps),
        )
        params.validate()
        return params

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as written to `head.npz`."""
        return {k: getattr(self, k) for k in HEAD_ARRAYS}

    @functools.cached_property
    def key_projection(self) -> np.ndarray:
        """`(W_q^T W_k / sqrt(D))^T`: maps `LN_k(T)` to the keys (computed once per head, not per table)."""
        d = self.embed_dim
        projection: np.ndarray = (self.w_q.T @ self.w_k / np.float32(math.sqrt(d))).T.astype(np.float32)
        return projection

    def vision_logits(self, f: np.ndarray) -> np.ndarray:
        """`W2 relu(W1 f + b1) + b2`, `[B, S]` over the trained classes."""
        h = np.maximum(f @ self.mlp_w1.T + self.mlp_b1, 0.0)
        logits: np.ndarray = h @ self.mlp_w2.T + self.mlp_b2
        return logits

    def queries(self, f: np.ndarray) -> np.ndarray:
        """`LN_q(f)`: the image side of the attention (W_q is folded into the table's keys)."""
        return layer_norm(f, self.ln_q_weight, self.ln_q_bias, self.ln_eps)


@dataclass(frozen=True)
class ClassEntry:
    """One class of a table: its name, anchors `[M, D]` (raw text features, zero padded) and mask `[M]`."""

    name: str
    anchors: np.ndarray
    mask: np.ndarray


# Spare rows a table buffer gets when it is (re)allocated: a quarter of the rows it holds, at least this many.
_MIN_SPARE_CLASSES = 256


class _RowStore:
    """The buffers behind a chain of tables built by `with_added`: per-class arrays with spare rows.

    `filled` is how many classes hold data; the table with that many classes is the newest and the only one
    that may write into the spare rows (older tables keep views of the rows they had, which never change)."""

    def __init__(self, table: ClassTable, extra: int) -> None:
        c, m, d = table.num_classes, table.num_anchors, table.embed_dim
        capacity = c + max(extra, _MIN_SPARE_CLASSES, (c + extra) // 4)
        k = table.prototypes.shape[1]
        self.keys = np.empty((capacity * m, d), dtype=np.float32)
        self.anchors = np.empty((capacity * m, d), dtype=np.float32)
        self.gram = np.empty((capacity, m, m), dtype=np.float32)
        self.mask = np.empty((capacity, m), dtype=bool)
        self.mask_bias = np.empty((capacity, m), dtype=np.float32)
        self.prototypes = np.empty((capacity, k), dtype=np.float32)
        self.capacity = capacity
        self.filled = 0
        self.lock = threading.Lock()
        self.write(0, table)

    def write(self, at: int, rows: ClassTable) -> None:
        """Copy `rows`' classes into rows `at`..; `filled` becomes their end."""
        m, n = rows.num_anchors, rows.num_classes
        self.keys[at * m : (at + n) * m] = rows.keys
        self.anchors[at * m : (at + n) * m] = rows.anchors
        self.gram[at : at + n] = rows.gram
        self.mask[at : at + n] = rows.mask
        self.mask_bias[at : at + n] = rows.mask_bias
        self.prototypes[at : at + n] = rows.prototypes
        self.filled = at + n


@dataclass(frozen=True, eq=False)
class ClassTable:
    """Precomputed scoring matrices for a set of classes; see the module docstring. Build with `build`."""

    names: tuple[str, ...]
    num_trained: int
    num_anchors: int
    embed_dim: int
    keys: np.ndarray  # [C*M, D]
    anchors: np.ndarray  # [C*M, D]
    gram: np.ndarray  # [C, M, M]
    mask: np.ndarray  # [C, M] bool
    mask_bias: np.ndarray  # [C, M] float32, 0 or -inf
    prototypes: np.ndarray  # [C, K] sketched unit mean of each class's anchors (the shortlist's cheap score)
    logit_scale: float
    _index: Mapping[str, int] = field(repr=False, default_factory=dict)
    _rows: _RowStore | None = field(repr=False, default=None)

    @classmethod
    def build(
        cls,
        anchors: np.ndarray,
        mask: np.ndarray,
        params: HeadParams,
        names: Sequence[str],
        *,
        num_trained: int | None = None,
    ) -> ClassTable:
        """Precompute a table from anchors `[C, M, D]`, mask `[C, M]` and the head parameters.

        `num_trained` (default: all) says how many leading classes are trained ones (have vision logits).
        """
        anchors = np.ascontiguousarray(anchors, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if anchors.ndim != 3:
            raise ValueError(f"anchors must be [C, M, D], got shape {anchors.shape}")
        c, m, d = anchors.shape
        if mask.shape != (c, m):
            raise ValueError(f"anchor mask shape {mask.shape} does not match anchors {anchors.shape}")
        if d != params.embed_dim:
            raise ValueError(f"anchors have dimension {d}, the head {params.embed_dim}")
        if len(names) != c:
            raise ValueError(f"{len(names)} class names for {c} anchor rows")
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise ValueError(f"classes {[names[i] for i in empty[:10]]} have no anchors; every class needs one")
        if not np.all(np.isfinite(anchors)):
            raise ValueError("anchors hold non-finite values")
        trained = c if num_trained is None else int(num_trained)
        if not 0 <= trained <= c:
            raise ValueError(f"num_trained={trained} outside [0, {c}]")
        index = {}
        for i, name in enumerate(names):
            if name in index:
                raise ValueError(f"class name {name!r} appears twice")
            index[name] = i
        keys = _keys(anchors, params)
        gram = np.matmul(anchors, anchors.transpose(0, 2, 1))
        return cls(
            names=tuple(names),
            num_trained=trained,
            num_anchors=m,
            embed_dim=d,
            keys=keys,
            anchors=anchors.reshape(c * m, d),
            gram=gram,
            mask=mask,
            mask_bias=np.where(mask, np.float32(0.0), np.float32(-np.inf)).astype(np.float32),
            prototypes=_sketch(class_directions(anchors, mask)),
            logit_scale=float(params.logit_scale),
            _index=index,
        )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_added(self) -> int:
        return self.num_classes - self.num_trained

    def index_of(self, name: str) -> int | None:
        """Class id of `name`, or None."""
        return self._index.get(name)

    def anchors_of(self, i: int) -> np.ndarray:
        """Anchors `[M, D]` of class `i` (padding included)."""
        m = self.num_anchors
        return self.anchors[i * m : (i + 1) * m]

    def attention(self, queries: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The head's attention weights `[B, n, M]` of each image over the anchors of `classes` (ids `[n]`);
        padding anchors get exactly 0 and each row sums to 1 (the `attn` of the language logits)."""
        m, d = self.num_anchors, self.embed_dim
        classes = np.asarray(classes, dtype=np.intp)
        keys = self.keys.reshape(-1, m, d)[classes]  # [n, M, D]
        scores = np.einsum("bd,nmd->bnm", np.asarray(queries, dtype=np.float32), keys) + self.mask_bias[classes]
        return softmax(scores, axis=-1)

    def with_added(self, entries: Iterable[ClassEntry], params: HeadParams) -> ClassTable:
        """A new table: this one's classes followed by `entries` (added classes). This table is unchanged."""
        entries = list(entries)
        if not entries:
            return self
        m, d = self.num_anchors, self.embed_dim
        for e in entries:
            if e.anchors.shape != (m, d) or e.mask.shape != (m,):
                raise ValueError(
                    f"class {e.name!r}: anchors {e.anchors.shape} / mask {e.mask.shape}, expected ({m}, {d}) / ({m},)"
                )
        new = ClassTable.build(
            np.stack([e.anchors for e in entries]),
            np.stack([e.mask for e in entries]),
            params,
            [e.name for e in entries],
            num_trained=0,
        )
        clash = [n for n in new.names if n in self._index]
        if clash:
            raise ValueError(f"class name(s) {clash} already in the table")
        names = self.names + new.names
        index = dict(self._index)
        index.update({n: i for i, n in enumerate(new.names, start=self.num_classes)})
        c, total = self.num_classes, self.num_classes + new.num_classes
        rows = self._rows
        with rows.lock if rows is not None else _NO_LOCK:
            if rows is None or rows.filled != c or rows.capacity < total:
                # Not the newest table of its chain, or no room left: new buffers (amortised by their spare rows).
                rows = _RowStore(self, new.num_classes)
            rows.write(c, new)
        return ClassTable(
            names=names,
            num_trained=self.num_trained,
            num_anchors=m,
            embed_dim=d,
            keys=rows.keys[: total * m],
            anchors=rows.anchors[: total * m],
            gram=rows.gram[:total],
            mask=rows.mask[:total],
            mask_bias=rows.mask_bias[:total],
            prototypes=rows.prototypes[:total],
            logit_scale=self.logit_scale,
            _index=index,
            _rows=rows,
        )

    def trained_only(self) -> ClassTable:
        """The table restricted to the trained classes (the base to re-add a changed set of classes to)."""
        if self.num_added == 0:
            return self
        s, m = self.num_trained, self.num_anchors
        names = self.names[:s]
        return ClassTable(
            names=names,
            num_trained=s,
            num_anchors=m,
            embed_dim=self.embed_dim,
            keys=self.keys[: s * m].copy(),
            anchors=self.anchors[: s * m].copy(),
            gram=self.gram[:s].copy(),
            mask=self.mask[:s].copy(),
            mask_bias=self.mask_bias[:s].copy(),
            prototypes=self.prototypes[:s].copy(),
            logit_scale=self.logit_scale,
            _index={n: i for i, n in enumerate(names)},
        )

    def language_logits(self, queries: np.ndarray, f: np.ndarray, shortlist: Shortlist | None = None) -> np.ndarray:
        """`s * cos(f, sum_m a_cm T_cm)` for every class of the table, `[B, C]`.

        Args:
            queries: `LN_q(f)` from :meth:`HeadParams.queries`, `[B, D]`.
            f: raw image features `[B, D]`.
            shortlist: with many added classes, score exactly only the added classes each image is closest to
                (see :class:`Shortlist`); None scores every class exactly.
        """
        f = np.asarray(f, dtype=np.float32)
        f_hat = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), np.float32(_EPS))
        c, s = self.num_classes, self.num_trained
        if shortlist is None or not shortlist.applies(self.num_added):
            return self._exact(queries, f_hat, slice(0, c))
        out = np.empty((f.shape[0], c), dtype=np.float32)
        out[:, :s] = self._exact(queries, f_hat, slice(0, s))
        # Every added class gets the cheap score (cosine in the sketch), then the union of the images'
        # shortlists is scored exactly.
        np.matmul(_sketch(f_hat), self.prototypes[s:].T, out=out[:, s:])
        out[:, s:] *= np.float32(self.logit_scale)
        k = shortlist.size
        near = np.unique(np.argpartition(-out[:, s:], k - 1, axis=1)[:, :k]) + s
        out[:, near] = self._exact(queries, f_hat, near)
        return out

    def _exact(self, queries: np.ndarray, f_hat: np.ndarray, classes: slice | np.ndarray) -> np.ndarray:
        """Exact language logits `[B, n]` of a class range (views, no copy) or an index array (gathered)."""
        m, d = self.num_anchors, self.embed_dim
        if isinstance(classes, slice):
            rows = slice(classes.start * m, classes.stop * m)
            keys, anchors = self.keys[rows], self.anchors[rows]
        else:
            keys = self.keys.reshape(-1, m, d)[classes].reshape(-1, d)
            anchors = self.anchors.reshape(-1, m, d)[classes].reshape(-1, d)
        gram, mask_bias = self.gram[classes], self.mask_bias[classes]
        b, n = f_hat.shape[0], gram.shape[0]
        out = np.empty((b, n), dtype=np.float32)
        step = max(1, _CHUNK_ELEMENTS // max(1, b * m))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            rows = slice(lo * m, hi * m)
            scores = (queries @ keys[rows].T).reshape(b, hi - lo, m) + mask_bias[lo:hi]
            attn = softmax(scores, axis=-1)
            proj = (f_hat @ anchors[rows].T).reshape(b, hi - lo, m)
            numerator = np.sum(attn * proj, axis=-1)
            a_t = attn.transpose(1, 0, 2)  # [c, B, M]
            sq_norm = np.sum(np.matmul(a_t, gram[lo:hi]) * a_t, axis=-1).T
            out[:, lo:hi] = self.logit_scale * numerator / np.sqrt(np.maximum(sq_norm, np.float32(_EPS)))
        return out


@dataclass(frozen=True)
class Shortlist:
    """Scoring only some added classes exactly, for tables with many thousands of them.

    Exact scoring reads every class's anchors and keys for every batch, so its cost grows with the table
    (1.6 GB per batch at 50,000 classes of 8 anchors in 512 dimensions); past `min_added` added classes,
    each image ranks the added classes by the cosine to their anchors' unit mean, estimated in a
    128-dimensional sketch (one matrix-vector product per image), the union of the images' `size` best is
    scored exactly, and the rest keep that estimate.
    Trained classes are always scored exactly. The top classes are then those of the exact scoring unless the
    right class falls outside the shortlist; `tests/unit/runtime/test_head_shortlist.py` measures how often it does.
    """

    size: int = 256
    min_added: int = 4096

    def __post_init__(self) -> None:
        if self.size < 1 or self.min_added < 0:
            raise ValueError(f"shortlist size must be >= 1 and min_added >= 0, got {self.size}, {self.min_added}")

    def applies(self, num_added: int) -> bool:
        """Whether a table with `num_added` added classes is shortlisted."""
        return num_added > max(self.min_added, self.size)


_SKETCH_DIMS = 128
_NO_LOCK = contextlib.nullcontext()


@functools.lru_cache(maxsize=4)
def _sketch_matrix(d: int) -> np.ndarray | None:
    """`[D, 128]` random orthonormal columns scaled by sqrt(D / 128), fixed for a given D (None when D <= 128).

    Inner products of sketched unit vectors estimate their cosines (Johnson-Lindenstrauss, spread about
    1/sqrt(128)), which is enough to find an image's few hundred nearest classes among many thousands in a
    quarter of the memory traffic; the shortlisted ones are then scored exactly."""
    if d <= _SKETCH_DIMS:
        return None
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, _SKETCH_DIMS)))
    return (q * math.sqrt(d / _SKETCH_DIMS)).astype(np.float32)


def _sketch(x: np.ndarray) -> np.ndarray:
    m = _sketch_matrix(x.shape[-1])
    return x if m is None else np.ascontiguousarray(x @ m, dtype=np.float32)


def class_directions(anchors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`[C, D]` unit mean of each class's unit-normalised anchors `[C, M, D]` (padding, `mask` `[C, M]` False,
    left out): a class's text direction, `unit_mean` of its anchors."""
    norms = np.maximum(np.linalg.norm(anchors, axis=-1, keepdims=True), np.float32(_EPS))
    mean = np.sum((anchors / norms) * mask[..., None], axis=1)
    length = np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), np.float32(_EPS))
    directions: np.ndarray = (mean / length).astype(np.float32)
    return directions


def _keys(anchors: np.ndarray, params: HeadParams) -> np.ndarray:
    """`W_q^T W_k LN_k(T) / sqrt(D)` as `[C*M, D]`, computed in row blocks to bound the temporaries."""
    # K = W_k LN_k(T); the score q.K / sqrt(D) with q = W_q LN_q(f) equals LN_q(f) . (W_q^T K) / sqrt(D).
    d = params.embed_dim
    flat = anchors.reshape(-1, d)
    combined = params.key_projection  # x -> x W_k^T W_q
    out = np.empty_like(flat)
    step = max(1, _CHUNK_ELEMENTS // d)
    for lo in range(0, flat.shape[0], step):
        block = layer_norm(flat[lo : lo + step], params.ln_k_weight, params.ln_k_bias, params.ln_eps)
        np.matmul(block, combined, out=out[lo : lo + step])
    return out


def log_prior_from_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """`log(n_c / sum n)` of the trained classes; every count must be positive."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError("train counts must be a non-empty list")
    bad = np.flatnonzero(~(counts > 0))
    if bad.size:
        raise ValueError(f"trained classes {bad[:10].tolist()} have train_count <= 0; the prior needs positive counts")
    prior: np.ndarray = np.log(counts / counts.sum()).astype(np.float32)
    return prior


ADDED_CLASS_VISION_MODES = ("none", "standardised")
# Where the calibration temperature T applies. "fused": to the log of the fused distribution, `p ** (1 / T)`
# renormalised, which keeps every image's ranking, so calibrating confidence never changes a prediction.
# "branches": to each branch's logits before the mixture (bundles written before "fused" existed), which moves
# the fused argmax: 5.4 and 1.6 points of balanced accuracy on two Shapes-LT models' test split (docs/bundle.md).
TEMPERATURE_MODES = ("fused", "branches")


def _added_vision_logits(vis: np.ndarray, lin_trained: np.ndarray, lin_added: np.ndarray) -> np.ndarray:
    """Vision-branch stand-in logits of added classes: their language logits mapped, per image, onto the
    vision branch's scale by matching the mean and std of the trained classes' logits in the two branches."""
    mu_v, sd_v = vis.mean(axis=1, keepdims=True), vis.std(axis=1, keepdims=True)
    mu_l, sd_l = lin_trained.mean(axis=1, keepdims=True), lin_trained.std(axis=1, keepdims=True)
    logits: np.ndarray = mu_v + (lin_added - mu_l) * (sd_v / np.maximum(sd_l, np.float32(_EPS)))
    return logits


def _check_modes(added_class_vision: str, temperature_on: str) -> None:
    if added_class_vision not in ADDED_CLASS_VISION_MODES:
        raise ValueError(f"unknown added_class_vision {added_class_vision!r}; use one of {ADDED_CLASS_VISION_MODES}")
    if temperature_on not in TEMPERATURE_MODES:
        raise ValueError(f"unknown temperature_on {temperature_on!r}; use one of {TEMPERATURE_MODES}")


def split_temperature(temperature: float, temperature_on: str) -> tuple[float, float]:
    """Where `temperature_on` puts T: `(on each branch's logits, on the fused distribution)`, the other 1."""
    return (temperature, 1.0) if temperature_on == "branches" else (1.0, temperature)


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature on a distribution's log-probabilities: each row `p ** (1 / T)`, renormalised.

    Monotone in `p`, so every row keeps its ranking; a zero stays zero."""
    if temperature == 1.0:
        return probs
    with np.errstate(divide="ignore"):
        log_p = np.log(probs)
    return softmax(log_p / np.float32(temperature), axis=-1)


def branch_probabilities(
    z_vis: np.ndarray,
    z_lin: np.ndarray,
    log_prior: np.ndarray,
    *,
    tau: float = 0.0,
    temperature: float = 1.0,
    temperature_on: str = "fused",
    added_class_bias: float = 0.0,
    added_class_vision: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """The two branches of :func:`calibrated_probabilities` before they are mixed: `(vision, language)`.

    `vision` is `[B, S]` (`added_class_vision="none"`: the trained classes only) or `[B, S + A]`
    (`"standardised"`), `language` is `[B, S + A]`; each row of each sums to 1. Their mixture is
    `alpha * vision + (1 - alpha) * language`, an added class getting no vision term when `vision` is `[B, S]`;
    the served probability is that mixture tempered (:func:`temper`) when `temperature_on="fused"`, and the
    mixture itself when `"branches"` (then each branch here already carries the temperature).
    """
    _check_modes(added_class_vision, temperature_on)
    z_vis = np.asarray(z_vis, dtype=np.float32)
    z_lin = np.asarray(z_lin, dtype=np.float32)
    s = z_vis.shape[1]
    if z_lin.shape[1] < s or np.shape(log_prior) != (s,):
        raise ValueError(
            f"shapes do not fit: z_vis {z_vis.shape}, z_lin {z_lin.shape}, log_prior {np.shape(log_prior)}"
        )
    adjust = np.float32(tau) * np.asarray(log_prior, dtype=np.float32)
    lin = z_lin.copy()
    lin[:, :s] -= adjust
    lin[:, s:] += np.float32(added_class_bias)
    vis = z_vis - adjust
    if added_class_vision == "standardised" and lin.shape[1] > s:
        vis = np.concatenate([vis, _added_vision_logits(vis, lin[:, :s], lin[:, s:])], axis=1)
    t = np.float32(split_temperature(temperature, temperature_on)[0])
    return softmax(vis / t, axis=-1), softmax(lin / t, axis=-1)


def calibrated_probabilities(
    z_vis: np.ndarray,
    z_lin: np.ndarray,
    log_prior: np.ndarray,
    *,
    alpha: float,
    tau: float = 0.0,
    temperature: float = 1.0,
    temperature_on: str = "fused",
    added_class_bias: float = 0.0,
    added_class_vision: str = "none",
) -> np.ndarray:
    """numpy twin of `vlltr.model.networks.head.calibrated_probabilities` (same arguments, same result).

    `z_vis` `[B, S]` covers the S trained classes, `z_lin` `[B, S + A]` the trained then the added classes.
    Trained logits get `- tau * log_prior`, added language logits `+ added_class_bias`. With
    `added_class_vision="none"` the vision softmax covers the trained classes only (an added class gets 0 of
    its mass); with `"standardised"` each added class also gets a vision logit, its adjusted language logit
    mapped onto the vision scale (`mean_v + (l - mean_l) * std_v / std_l`, moments over the image's trained
    classes), so it competes in both branches. The mixture `alpha * softmax(vision) + (1 - alpha) *
    softmax(language)` (the two terms: :func:`branch_probabilities`) is then tempered, `p ** (1 / temperature)`
    renormalised (`temperature_on="fused"`); `"branches"` divides each branch's logits by the temperature
    instead, the rule of older bundles (`TEMPERATURE_MODES`).
    """
    vis, lin = branch_probabilities(
        z_vis,
        z_lin,
        log_prior,
        tau=tau,
        temperature=temperature,
        temperature_on=temperature_on,
        added_class_bias=added_class_bias,
        added_class_vision=added_class_vision,
    )
    out = (1.0 - np.float32(alpha)) * lin
    out[:, : vis.shape[1]] += np.float32(alpha) * vis
    return temper(out, split_temperature(temperature, temperature_on)[1])


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need at least one {what} feature [n, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} features hold non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms <= _EPS):
        raise ValueError(f"a {what} feature has zero norm")
    unit: np.ndarray = x / norms
    return unit


def build_added_class_anchors(
    descriptions_features: np.ndarray,
    num_anchors: int,
    *,
    reference: np.ndarray | None = None,
    others: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the anchors of a class added by text alone (no images to rank sentences by).

    Rule: each sentence is scored by its cosine to a target direction, minus (when `others` is given) its
    highest cosine to any other class; the `num_anchors` best are kept (ties: earlier sentence first). The
    target is the mean direction of `reference` (e.g. the class-name prompts' text features) or, without
    one, the centroid of the class's own sentences. The centroid alone is pulled by distractors that reuse
    other classes' visual words; the class name and the other classes' directions are what tell such a
    sentence from a description without images. All sentences are kept when there are at most M.

    Args:
        descriptions_features: `[n, D]` raw text features of the class's description sentences.
        num_anchors: M, the table's anchor count.
        reference: optional `[r, D]` text features that name the class (its prompt-templated name).
        others: optional `[K, D]` text features of the other classes (e.g. their name prompts or anchors).

    Returns:
        `(anchors [M, D] raw features zero padded, mask [M] bool, chosen sentence indices in anchor order)`.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be positive, got {num_anchors}")
    x = np.asarray(descriptions_features, dtype=np.float32)
    unit = _unit_rows(x, "description")
    target = (_unit_rows(reference, "reference") if reference is not None else unit).mean(axis=0)
    target /= max(float(np.linalg.norm(target)), _EPS)
    score = unit @ target
    if others is not None:
        score = score - (unit @ _unit_rows(others, "other-class").T).max(axis=1)
    chosen = np.argsort(-score, kind="stable")[:num_anchors]
    anchors = np.zeros((num_anchors, x.shape[1]), dtype=np.float32)
    anchors[: chosen.size] = x[chosen]
    mask = np.zeros(num_anchors, dtype=bool)
    mask[: chosen.size] = True
    return anchors, mask, chosen


def unit_mean(features: np.ndarray) -> np.ndarray:
    """Unit vector of the mean of unit vectors: one class's text direction (from its anchors)."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(_EPS))
    m = x.mean(axis=0)
    unit: np.ndarray = (m / max(float(np.linalg.norm(m)), _EPS)).astype(np.float32)
    return unit


def load_head_npz(path: str | Path, *, logit_scale: float, ln_eps: float = 1e-5) -> HeadParams:
    """Read `head.npz` (no pickles) into :class:`HeadParams`."""
    with np.load(path, allow_pickle=False) as data:
        return HeadParams.from_arrays({k: data[k] for k in data.files}, logit_scale=logit_scale, ln_eps=ln_eps)
