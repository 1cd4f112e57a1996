"""The open_clip backbone factory: project tiny configs, local checkpoints, clear errors."""

from __future__ import annotations

import pytest
import torch

from vlltr.model.networks.factory import (
    UnknownArchitectureError,
    clip_dims,
    create_clip,
    get_tokenizer,
    list_architectures,
    project_architectures,
)


def test_tiny_architectures_are_registered_next_to_open_clip_ones():
    names = list_architectures()
    assert {"vlltr-tiny-vit", "vlltr-tiny-rn"} <= set(project_architectures()) <= set(names)
    assert {"RN50", "ViT-B-16"} <= set(names)


@pytest.mark.parametrize("arch", ["vlltr-tiny-vit", "vlltr-tiny-rn"])
def test_tiny_dims(arch):
    dims = clip_dims(create_clip(arch))
    assert (dims.embed_dim, dims.image_size, dims.context_length, dims.vocab_size) == (64, 32, 77, 49408)


def test_unknown_architecture_names_close_matches():
    with pytest.raises(UnknownArchitectureError, match="RN50"):
        create_clip("rn50")
    with pytest.raises(UnknownArchitectureError, match="not-a-model"):
        create_clip("not-a-model")


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    source = create_clip("vlltr-tiny-vit")
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = create_clip("vlltr-tiny-vit", str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_checkpoint_and_unknown_tag():
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_clip("vlltr-tiny-vit", "/nonexistent/missing.pt")
    with pytest.raises(ValueError, match="pretrained tag"):
        create_clip("RN50", "no-such-tag")


def test_tokenizer_wraps_in_sot_eot_and_pads():
    tokens = get_tokenizer("vlltr-tiny-vit")(["a red star"])
    assert tokens.shape == (1, 77)
    row = tokens[0].tolist()
    n = sum(t != 0 for t in row)
    assert row[0] == 49406 and row[n - 1] == 49407 and all(t == 0 for t in row[n:])
