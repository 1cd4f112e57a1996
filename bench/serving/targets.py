"""The issue's targets, computed from a results dict: each `{"value", "goal", "met", "what"}`."""

from __future__ import annotations

from typing import Any


def _target(value: float | None, goal: float, higher_is_better: bool, what: str) -> dict[str, Any]:
    met = None if value is None else (value >= goal if higher_is_better else value <= goal)
    return {
        "value": None if value is None else round(float(value), 4),
        "goal": goal,
        "comparison": ">=" if higher_is_better else "<=",
        "met": met,
        "what": what,
    }


def _tput(cell: dict | None) -> float | None:
    return None if not cell else cell.get("throughput")


def compute_targets(results: dict[str, Any], small: str, realistic: str | None, c: str = "32") -> dict[str, Any]:
    """Every target of the issue for which the run has the measurements (comparisons at concurrency `c`)."""
    targets: dict[str, Any] = {}
    if realistic and realistic in results["models"]:
        r = results["models"][realistic]
        svc = _tput(r["service"]["load"].get(c))
        ceiling = r["ceiling"]["best"]["images_per_s"]
        targets["realistic_service_vs_ceiling"] = _target(
            svc / ceiling if svc is not None else None,
            0.95,
            True,
            f"{realistic}: service throughput at concurrency {c} / in-process ceiling",
        )
    s = results["models"][small]
    svc = _tput(s["service"]["load"].get(c))
    peers = {name: _tput(cell) for name, cell in s.get("peers", {}).items() if _tput(cell)}
    if svc is not None and peers:
        best_name = max(peers, key=lambda k: peers[k])
        targets["small_service_vs_best_peer"] = _target(
            svc / peers[best_name], 2.0, True, f"{small}: service / best peer framework ({best_name}), c={c}"
        )
    hand = _tput(s.get("handwritten"))
    if svc is not None and hand:
        targets["small_service_vs_handwritten"] = _target(
            svc / hand, 3.0, True, f"{small}: service / hand-written FastAPI + PyTorch server, c={c}"
        )
    if svc is not None:
        targets["small_service_vs_ceiling"] = _target(
            svc / s["ceiling"]["best"]["images_per_s"], 0.4, True, f"{small}: service / in-process ceiling, c={c}"
        )
    cache = s.get("cache")
    if cache and "1" in cache["load"]:
        # The client's p50 includes the server's time plus the client's and the network's, so it bounds the
        # server-side p50 from above (the server's histogram only says which 1-2.5 ms bucket it is in).
        p50 = cache["load"]["1"]["p50_ms"]
        targets["cache_hit_p50_ms_server"] = _target(
            p50,
            2.0,
            False,
            f"{small}: cache hit p50 at concurrency 1, measured by the client (an upper bound of the server-side p50)",
        )
    growth = s.get("classes")
    if growth and "1000" in growth and "50000" in growth:
        a = growth["1000"]["load"]["1"]["p50_ms"]
        b = growth["50000"]["load"]["1"]["p50_ms"]
        targets["latency_50k_vs_1k_classes"] = _target(
            b / a, 1.5, False, f"{small}: p50 latency at 50,000 / at 1,000 classes, c=1"
        )
    add = s.get("add_class")
    if add:
        targets["add_class_p99_ratio"] = _target(
            add["with_adds"]["p99_ms"] / add["without"]["p99_ms"],
            1.5,
            False,
            f"{small}: p99 while classes are added / p99 without, c={add['concurrency']}",
        )
    return targets
