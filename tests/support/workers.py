"""Load and process helpers for the tests of the multi-process service (`vlltr serve --workers N`)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import httpx

from support.processes import LOG_TAIL


@dataclass
class Answer:
    """One request of a `Load`: when it was sent and answered, and how."""

    sent: float
    answered: float
    status: int | None  # None: no HTTP answer (`error` says why)
    worker: str | None = None
    retry_after: str | None = None
    code: str | None = None
    error: str | None = None


@dataclass
class Load:
    """`threads` clients classifying `image` (a raw JPEG body) in a loop until `stop()`, each request on a new
    connection, so the kernel spreads them over every front-end that accepts."""

    url: str
    image: bytes
    threads: int = 4
    timeout_s: float = 30.0
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Answer]:
        """Stop sending and wait for every request already sent to be answered (or to fail)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 10)
            assert not t.is_alive(), "a load thread still waits for an answer: a request hangs"
        return self.answers

    def _run(self) -> None:
        headers = {"content-type": "image/jpeg", "connection": "close"}
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                r = httpx.post(f"{self.url}/v1/classify", content=self.image, headers=headers, timeout=self.timeout_s)
                code = None
                if r.status_code != 200 and r.headers.get("content-type") == "application/json":
                    code = r.json()["error"]["code"]
                answer = Answer(
                    sent,
                    time.monotonic(),
                    r.status_code,
                    r.headers.get("x-vlltr-worker"),
                    r.headers.get("retry-after"),
                    code,
                )
            except httpx.HTTPError as exc:
                answer = Answer(sent, time.monotonic(), None, error=type(exc).__name__)
                time.sleep(0.01)
            with self._lock:
                self.answers.append(answer)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Whether `predicate(answers so far)` became true within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                snapshot = list(self.answers)
            if predicate(snapshot):
                return True
            time.sleep(0.05)
        return False


def engine_pid(log: str) -> int:
    """The pid of the engine the supervisor started last (from its whole log: `ServerProcess.log(tail=None)`)."""
    pids = re.findall(r"engine started \(pid (\d+)\)", log)
    assert pids, f"no engine in the log:\n{log[-LOG_TAIL:]}"
    return int(pids[-1])


def frontend_pids(log: str) -> list[int]:
    """The pids of every front-end the supervisor started (from its whole log), in order."""
    return [int(p) for p in re.findall(r"front-end \d+ started \(pid (\d+)\)", log)]


def counter(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, in a Prometheus text exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
