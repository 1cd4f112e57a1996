"""Clients that stall, on raw sockets, and what the server answers them (tests of slow clients).

`stalled_upload` sends a classify request's headers and the first line of its multipart body, then nothing;
`read_until_closed` waits on many sockets at once until the server closes each, collecting what it sent.
`raise_open_file_limit` lets the test process (and the servers it starts, which inherit it) hold thousands of
sockets.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time

BOUNDARY = "stalledboundary"


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `wanted` (within the hard limit); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def stalled_upload(port: int, content_length: int = 100_000, path: str = "/v1/classify") -> socket.socket:
    """A connection that sent a multipart upload's headers and its first body line, and then stops."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode("latin-1") + f"--{BOUNDARY}\r\n".encode("latin-1"))
    return sock


def stalled_raw(port: int, content_length: int, content_type: str = "image/png") -> socket.socket:
    """A connection that sent a raw image upload's headers and a few bytes of the image, and then stops."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode("latin-1") + b"\x89PNG\r\n\x1a\n")
    return sock


def read_until_closed(socks: list[socket.socket], timeout: float) -> tuple[dict[int, bytes], dict[int, float]]:
    """Read every socket until the server closes it (or `timeout` seconds pass).

    Returns (what each socket received, when it was closed: `time.monotonic()`), keyed by position in `socks`;
    a socket still open at the end has no closing time. A reset counts as closed.
    """
    received = {i: b"" for i in range(len(socks))}
    closed: dict[int, float] = {}
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    try:
        while len(closed) < len(socks):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(min(left, 1.0)):
                i = key.data
                try:
                    data = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    data = b""
                if data:
                    received[i] += data
                    continue
                closed[i] = time.monotonic()
                selector.unregister(socks[i])
    finally:
        selector.close()
    return received, closed


def status_of(answer: bytes) -> int | None:
    """The status code of the HTTP response at the start of `answer` (None when there is none)."""
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])
