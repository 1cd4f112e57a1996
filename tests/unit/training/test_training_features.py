"""Bulk feature extraction: the trimmed text encoder equals open_clip's, rows come back in order."""

from __future__ import annotations

import pytest
import torch

from vlltr.model.networks.factory import create_clip, get_tokenizer
from vlltr.training.features import encode_images, encode_text, encode_token_table

SENTENCES = [
    "a red star",
    "the striped blue square is drawn on a white background with thin lines",
    "x",
    "a photo of a digit three, which has two open curves",
]


@pytest.mark.parametrize("arch", ["vlltr-tiny-vit", "vlltr-tiny-rn"])
def test_trimmed_text_encoder_is_exact(arch):
    torch.manual_seed(0)
    clip = create_clip(arch).eval()
    tokens = get_tokenizer(arch)(SENTENCES)
    with torch.no_grad():
        assert torch.allclose(encode_text(clip, tokens), clip.encode_text(tokens), atol=1e-5)


def test_gradients_flow_through_trimmed_encoder():
    clip = create_clip("vlltr-tiny-vit")
    encode_text(clip, get_tokenizer("vlltr-tiny-vit")(SENTENCES[:2])).sum().backward()
    assert clip.token_embedding.weight.grad is not None and clip.positional_embedding.grad is not None


def test_token_table_keeps_row_order_across_batches():
    torch.manual_seed(0)
    clip = create_clip("vlltr-tiny-vit").eval()
    tokens = get_tokenizer("vlltr-tiny-vit")(SENTENCES * 3)
    table = encode_token_table(clip, tokens, batch_size=5, progress=False)
    with torch.no_grad():
        assert torch.allclose(table, clip.encode_text(tokens), atol=1e-5)


def test_encode_images_concatenates_batches():
    batches = [(torch.ones(2, 3), [0, 1]), (2 * torch.ones(1, 3), [4])]
    feats, labels = encode_images(lambda x: x.sum(1, keepdim=True), batches, progress=False)
    assert feats.flatten().tolist() == [3.0, 3.0, 6.0] and labels.tolist() == [0, 1, 4]
    with pytest.raises(ValueError, match="empty"):
        encode_images(lambda x: x, [], progress=False)
