"""`vlltr serve --workers N` (N > 1): N HTTP front-end processes on one port and one engine process.

The `vlltr serve` process becomes the supervisor. It creates a private run directory (the engine's Unix sockets,
and the metric files of prometheus-client's multiprocess mode, so `/metrics` is one view of every process),
starts the engine (`vlltr.service.engine`) and waits until it has loaded the bundle (a bad bundle or provider
ends the command with one line and status 2, as in a single process), binds the port once (a port in use ends
the command the same way), and starts the front-ends (`vlltr.service.frontend`). Each listens on its own socket
on that port (`SO_REUSEPORT`): the kernel spreads new connections evenly among them. On one shared listening
socket the process that woke first took every connection of a burst (asyncio accepts up to the backlog per
wake-up), so a client opening 32 keep-alive connections at once got one front-end for all of them. A front-end
accepts once the engine is ready (warmed, class table loaded) or after `LINK_WAIT_S` at the latest, answering not
ready meanwhile, as a single process does while it warms (a store that cannot be reached at start keeps the
engine not ready, and the service must still answer). Then it watches:

- a front-end that dies is started again (the others keep serving meanwhile);
- an engine that dies is started again; meanwhile the front-ends answer every request it held, and every new
  one, 503 `not_ready` with Retry-After, and `/readyz` says not ready until the new engine is warmed;
- SIGTERM (or SIGINT) drains: the front-ends stop accepting and finish the requests in flight, then the engine
  stops; the run directory is removed.

A child of a supervisor that was killed outright is killed too (Linux `PR_SET_PDEATHSIG`), so no process is
left holding the port.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from vlltr.service.settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0  # a process that dies this soon after its start is started again only after this pause
FRONTEND_DRAIN_S = 13.0  # front-ends' graceful wait (10 s) plus their own release of resources
ENGINE_STOP_S = 10.0
START_ERROR_STATUS = 2
RUN_DIR_PREFIX = "vlltr-serve-"


def child_process_setup(settings: Settings, role: str) -> None:
    """First steps of a worker process: die with the supervisor, keep out of its terminal's Ctrl-C (the
    supervisor drains in order), log like `vlltr serve` with the role and pid."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before the line above
        os._exit(1)
    with contextlib.suppress(OSError):
        os.setpgrp()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{role} {os.getpid()}] %(name)s: %(message)s",
    )


def remove_stale_run_dirs() -> None:
    """Remove the run directories of supervisors that were killed outright (named by their pid): their
    sockets and metric files would otherwise stay in the temp dir."""
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*-*"):
        try:
            pid = int(path.name[len(RUN_DIR_PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue  # not ours
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


def reuse_port_socket(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to `host:port` with `SO_REUSEADDR` and (unless `reuse_port` is false) `SO_REUSEPORT`
    (IPv6 when `host` has a colon), not yet listening. Every front-end binds one to the same port and listens on
    it; `OSError` when the port is taken by another program."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    """Starts, watches and stops the engine and the front-ends (module docstring)."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.ctx = multiprocessing.get_context("spawn")
        remove_stale_run_dirs()
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.stopping = False
        self.engine: BaseProcess | None = None
        self.frontends: list[BaseProcess | None] = [None] * workers
        self.started_at: dict[int, float] = {}
        self.listener: socket.socket | None = None  # holds the port (bound, never listening)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: draining the front-ends, then stopping the engine", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status."""
        from vlltr.service.metrics import MULTIPROCESS_DIR_ENV

        # Set before any worker starts: prometheus-client reads it when a process first imports it.
        os.environ[MULTIPROCESS_DIR_ENV] = str(self.metrics_dir)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            refusal = self._start_engine(wait_loaded=True)
            if refusal is not None:
                print(f"vlltr serve: {' '.join(refusal.split())}", file=sys.stderr)
                return START_ERROR_STATUS
            if self.stopping:
                return 0
            try:
                self.listener = self._bind()
            except OSError as exc:
                where = f"{self.settings.host}:{self.settings.port}"
                print(f"vlltr serve: cannot listen on {where}: {exc}", file=sys.stderr)
                return START_ERROR_STATUS
            for i in range(self.workers):
                self._start_frontend(i)
            self._watch()
            self._drain()
            return 0
        finally:
            for proc in self._all():
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            if self.listener is not None:
                self.listener.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _all(self) -> list[BaseProcess]:
        return [p for p in [self.engine, *self.frontends] if p is not None]

    def _bind(self) -> socket.socket:
        # First a plain bind, which fails when any socket holds the port: SO_REUSEPORT alone would let this
        # service share a port with another of the same user's. Then the reservation, bound with SO_REUSEPORT
        # and never listening: only the front-ends' listening sockets receive connections.
        with reuse_port_socket(self.settings.host, self.settings.port, reuse_port=False) as probe:
            port = int(probe.getsockname()[1])
        sock = reuse_port_socket(self.settings.host, port)
        host, port = sock.getsockname()[:2]
        log.info("listening on %s:%d with %d front-end processes and one engine", host, port, self.workers)
        return sock

    def _start_engine(self, *, wait_loaded: bool) -> str | None:
        from vlltr.service.engine import run_engine

        receiver, sender = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=run_engine, args=(self.settings, self.run_dir, sender), name="vlltr-engine", daemon=False
        )
        proc.start()
        sender.close()
        self.engine = proc
        self.started_at[id(proc)] = time.monotonic()
        log.info("engine started (pid %s)", proc.pid)
        if not wait_loaded:
            receiver.close()
            return None
        try:
            while not self.stopping:
                if receiver.poll(0.2):
                    kind, detail = receiver.recv()
                    receiver.close()
                    return str(detail) if kind == "error" else None
                if not proc.is_alive():
                    break
        except EOFError:
            proc.join(5)
        receiver.close()
        if self.stopping:
            return None
        return f"the engine process exited with status {proc.exitcode} while loading {self.settings.bundle}"

    def _address(self) -> tuple[str, int]:
        assert self.listener is not None
        return self.settings.host, int(self.listener.getsockname()[1])  # the bound port, also when asked for 0

    def _start_frontend(self, index: int) -> None:
        from vlltr.service.frontend import run_frontend

        proc = self.ctx.Process(
            target=run_frontend,
            args=(self.settings, self._address(), self.run_dir, index),
            name=f"vlltr-frontend-{index}",
            daemon=False,
        )
        proc.start()
        self.frontends[index] = proc
        self.started_at[id(proc)] = time.monotonic()
        log.info("front-end %d started (pid %s)", index, proc.pid)

    def _watch(self) -> None:
        while not self.stopping:
            procs = self._all()
            wait([p.sentinel for p in procs], timeout=0.2)
            for proc in procs:
                if proc.is_alive() or self.stopping:
                    continue
                self._dead(proc)
                if proc is self.engine:
                    self._backoff(proc)
                    if not self.stopping:
                        self._start_engine(wait_loaded=False)
                else:
                    index = self.frontends.index(proc)
                    self._backoff(proc)
                    if not self.stopping:
                        self._start_frontend(index)

    def _dead(self, proc: BaseProcess) -> None:
        proc.join(1)
        log.error("%s (pid %s) exited with status %s; starting it again", proc.name, proc.pid, proc.exitcode)
        if proc.pid is not None:
            from prometheus_client import multiprocess

            # Its gauges leave the live sums; its counters and histograms stay counted.
            multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]

    def _backoff(self, proc: BaseProcess) -> None:
        if time.monotonic() - self.started_at.pop(id(proc), 0.0) < RESTART_BACKOFF_S:
            deadline = time.monotonic() + RESTART_BACKOFF_S
            while time.monotonic() < deadline and not self.stopping:
                time.sleep(0.05)

    def _drain(self) -> None:
        # The front-ends first: they stop accepting and finish their requests, which still need the engine.
        frontends = [p for p in self.frontends if p is not None and p.is_alive()]
        for proc in frontends:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        _join_all(frontends, FRONTEND_DRAIN_S)
        if self.engine is not None and self.engine.is_alive():
            self.engine.terminate()
            _join_all([self.engine], ENGINE_STOP_S)
        log.info("stopped")


def _join_all(procs: list[BaseProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.error("%s (pid %s) did not stop within %.0f s; killing it", proc.name, proc.pid, timeout)
            proc.kill()
            proc.join(5)


def serve_workers(settings: Settings) -> int:
    """Run the multi-process service (`settings.worker_count` front-ends); the exit status."""
    return Supervisor(settings, settings.worker_count).run()
