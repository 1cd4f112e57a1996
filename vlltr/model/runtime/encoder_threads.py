"""Whether the CPU image encoder runs on onnxruntime's default intra-op threads or on one.

Intra-op threads pay off when the encoder's operators are large enough to split: ViT-B/16 on two cores answers a
lone request in 217 ms on two threads against 374 ms on one (docs/benchmarks/serving.md, its lanes row). On a small
encoder (the demo model, well under a millisecond an image) waking the other threads for every operator costs more
than it saves, and those threads take cores from image decoding and the HTTP front-ends: on the demo bundle and two
cores, a lone image took 0.46 ms on one thread against 0.70 ms on two (the line the service logs at start). Which
case a bundle is in depends on the model and on the machine, so it is timed where it will run, once, when the
service starts: a lone image through either session, in turns, and the one-thread session is kept unless the
default one runs the image faster. A lone image decides because it is where more threads could only help (latency
at low load); under load the batches share the cores with the decoders, where one thread spends less CPU per image
whatever the batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlltr.model.runtime.machine import usable_cpus
from vlltr.model.runtime.sessions import ImageEncoder, ProviderName

MIN_ROUNDS = 5  # timed runs of each session at least
MAX_ROUNDS = 200  # and at most (a small encoder runs hundreds in the time budget)
BUDGET_S = 1.5  # time spent timing, once the minimum rounds have run


@dataclass(frozen=True)
class ThreadChoice:
    """What was timed and kept: `threads` is None for onnxruntime's default, 1 for one thread."""

    threads: int | None
    default_ms: float  # median time of a lone image with onnxruntime's default threads
    one_thread_ms: float  # and with one thread

    def describe(self) -> str:
        """One line for the log."""
        kept = "one intra-op thread" if self.threads == 1 else "onnxruntime's default intra-op threads"
        return (
            f"image encoder on {kept} (a lone image took {self.one_thread_ms:.2f} ms on one thread, "
            f"{self.default_ms:.2f} ms on the default threads)"
        )


def median_run_ms(
    encoders: list[ImageEncoder], size: int, *, min_rounds: int = MIN_ROUNDS, budget_s: float = BUDGET_S
) -> list[float]:
    """The median time of one image `[1, 3, size, size]` through each encoder, run in turns (so a change in
    the machine's load meets every encoder alike), after one untimed run each."""
    x = np.zeros((1, 3, size, size), dtype=np.float32)
    for encoder in encoders:
        encoder.encode(x)
    times: list[list[float]] = [[] for _ in encoders]
    started = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - started < budget_s and rounds < MAX_ROUNDS):
        for encoder, out in zip(encoders, times):
            t = time.perf_counter()
            encoder.encode(x)
            out.append(time.perf_counter() - t)
        rounds += 1
    return [1000.0 * statistics.median(t) for t in times]


def keep_one_thread_unless_slower(
    default: ImageEncoder, one_thread: Callable[[], ImageEncoder], size: int, *, budget_s: float = BUDGET_S
) -> tuple[ImageEncoder, ThreadChoice]:
    """`default` (a CPU session on onnxruntime's default threads) or the one-thread session `one_thread()`
    builds, whichever the module docstring's rule keeps, and what was timed. The other session is dropped."""
    single = one_thread()
    default_ms, one_ms = median_run_ms([default, single], size, budget_s=budget_s)
    if one_ms <= default_ms:
        return single, ThreadChoice(1, default_ms, one_ms)
    return default, ThreadChoice(None, default_ms, one_ms)


def create_image_encoder(
    path: str | Path,
    provider: ProviderName,
    threads: int | None,
    size: int,
    *,
    fp16: bool = False,
    spinning: bool = False,
) -> tuple[ImageEncoder, ThreadChoice | None]:
    """The image encoder session as the service creates it: `threads` intra-op threads when given; otherwise,
    on CPU with more than one usable core and no spinning (which asks for onnxruntime's own threading), the
    module docstring's choice, returned with what was timed (None: nothing was timed)."""
    encoder = ImageEncoder(path, provider, threads, fp16=fp16, spinning=spinning)
    if threads or spinning or encoder.provider != "cpu" or usable_cpus() < 2:
        return encoder, None
    return keep_one_thread_unless_slower(
        encoder, lambda: ImageEncoder(path, "cpu", 1, fp16=fp16, spinning=spinning), size
    )
