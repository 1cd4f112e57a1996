"""Start each system under test as its own server process on a free port."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.serving.procs import ServerProcess, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
BENCH_EXTRA_HINT = "pip install -e '.[bench]'"


class MissingPeerError(RuntimeError):
    """A peer framework (or the load generator) is not installed."""


def require(module: str, what: str) -> None:
    """Fail with an install hint when `module` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingPeerError(f"{what} ({module}) is not installed: {BENCH_EXTRA_HINT}")


def _clean_env() -> dict[str, str]:
    # The service reads VLLTR_* settings; a developer's shell must not change what is measured.
    return {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}


def _vlltr() -> list[str]:
    script = Path(sys.executable).with_name("vlltr")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vlltr.cli"]


@functools.cache
def service_supports_workers() -> bool:
    """Whether this checkout's `vlltr serve` has `--workers` (read from its --help)."""
    env = _clean_env()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [*_vlltr(), "serve", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    return proc.returncode == 0 and "--workers" in proc.stdout


class UnsupportedWorkersError(RuntimeError):
    """`--workers N` (N > 1) was asked of a `vlltr serve` that has no such flag."""


def worker_flags(workers: int) -> tuple[str, ...]:
    """The flags that run the service with `workers` HTTP front-end processes: `--workers N` where the flag
    exists (always passed there, since its default follows the cores); nothing for one worker where it
    does not.

    Raises:
        UnsupportedWorkersError: `workers` > 1 and `vlltr serve` has no `--workers`.
    """
    if service_supports_workers():
        return ("--workers", str(workers))
    if workers == 1:
        return ()
    raise UnsupportedWorkersError(f"vlltr serve in {REPO} has no --workers flag, so --workers {workers} cannot run")


def start_service(
    name: str, bundle: Path, work_dir: Path, *, flags: Sequence[str] = (), cache_size: int = 0
) -> ServerProcess:
    """`vlltr serve` on `bundle` with an in-process cache of `cache_size` entries (0 = none), a private
    class-store file and `flags` (e.g. `--max-batch-size 1`)."""
    port = free_port()
    store = work_dir / f"{name}.classes.json"
    cmd = [
        *_vlltr(),
        "serve",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--cache-size",
        str(cache_size),
        "--class-store",
        str(store),
        "--cache-dir",
        str(work_dir / "cache"),
        "--log-level",
        "warning",
        *flags,
    ]
    return _start(name, cmd, port, "/readyz", "/v1/classify?top_k=5", "file", work_dir)


def start_handwritten(name: str, run_dir: Path, work_dir: Path, *, device: str = "cpu") -> ServerProcess:
    """The hand-written FastAPI + PyTorch server on a finished run."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.serving.handwritten",
        "--run",
        str(run_dir),
        "--port",
        str(port),
        "--device",
        device,
    ]
    return _start(name, cmd, port, "/health", "/predict?top_k=5", "file", work_dir)


def start_litserve(
    name: str, bundle: Path, work_dir: Path, *, max_batch_size: int = 32, provider: str = "cpu"
) -> ServerProcess:
    """LitServe hosting the bundle's ONNX encoder with its own batching."""
    require("litserve", "LitServe")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.serving.litserve_peer",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--provider",
        provider,
    ]
    return _start(name, cmd, port, "/health", "/predict", "image", work_dir, body_format="json-base64")


def _start(
    name: str,
    cmd: list[str],
    port: int,
    ready: str,
    classify: str,
    field: str,
    work_dir: Path,
    body_format: str = "multipart",
) -> ServerProcess:
    env = _clean_env()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # cwd is the work dir so that nothing a framework writes lands in the checkout.
    return start_server(
        name,
        cmd,
        port=port,
        ready_path=ready,
        classify_path=classify,
        field=field,
        body_format=body_format,
        log_path=work_dir / "logs" / f"{name}.log",
        env=env,
        cwd=work_dir,
    )
