"""Raw CLIP features in bulk: image features of a dataset, text features of a token table.

`encode_text` runs a CLIP text tower on token rows trimmed to the batch's longest sequence. For open_clip's
causal text towers with EOT (argmax) pooling this is exact: a position only attends to earlier positions, so
the zero padding after the EOT token cannot change the EOT feature. Class sentences are short (tens of tokens
out of 77), so this is several times faster than running the padded rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import open_clip
import torch
from tqdm.auto import tqdm


def _trimmable(clip: torch.nn.Module) -> bool:
    return (
        isinstance(clip, open_clip.CLIP)
        and getattr(clip, "text_pool_type", None) == "argmax"
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip.transformer, "batch_first", True)
    )


def encode_text(clip: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Raw (un-normalised) projected text features, `[N, D]`; equal to `clip.encode_text(tokens)`."""
    # open_clip is untyped: what its model computes is bound to Tensor-typed names.
    features: torch.Tensor
    if not _trimmable(clip):
        features = clip.encode_text(tokens)
        return features
    length = int((tokens != 0).sum(dim=1).max().item()) if tokens.numel() else 1
    length = max(1, min(length, tokens.shape[1]))
    tokens = tokens[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if isinstance(clip.text_projection, torch.nn.Linear):
        features = clip.text_projection(x)
    else:
        features = x @ clip.text_projection
    return features


@torch.no_grad()
def encode_token_table(
    clip: open_clip.CLIP,
    tokens: torch.Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    desc: str = "text features",
    progress: bool = True,
) -> torch.Tensor:
    """Raw text features of every token row, `[N, D]` float32 on CPU, in the rows' order.

    Rows are processed sorted by length so that trimming pays off, then put back in order.
    """
    lengths = (tokens != 0).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out: torch.Tensor | None = None
    chunks = range(0, tokens.shape[0], batch_size)
    for start in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        feats = encode_text(clip, tokens[idx].to(device)).float().cpu()
        if out is None:
            out = torch.empty(tokens.shape[0], feats.shape[1])
        out[idx] = feats
    if out is None:
        raise ValueError("no sentences to encode")
    return out


@torch.no_grad()
def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    desc: str = "image features",
    progress: bool = True,
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `encode` (images -> features) to every batch; returns `(features [N, D] fp32 CPU, labels [N])`."""
    feats, labels = [], []
    for images, y in tqdm(batches, desc=desc, disable=not progress, leave=False, total=total):
        feats.append(encode(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y).long())
    if not feats:
        raise ValueError(f"{desc}: the dataset is empty")
    return torch.cat(feats), torch.cat(labels)
