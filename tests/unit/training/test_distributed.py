"""torch.distributed helpers in a single process: the gathers are the identity. Two processes (gloo) are
tests/integration/test_distributed.py."""

from __future__ import annotations

import torch


def test_single_process_gathers_are_identity():
    from vlltr.training.distributed import all_gather_tensor, all_gather_with_grad, init_distributed

    env = init_distributed("cpu")
    assert not env.is_distributed and env.is_main
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x and all_gather_tensor(x) is x
