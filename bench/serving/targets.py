"""The issue's targets, computed from a results dict: each `{"value", "goal", "met", "what"}`."""

from __future__ import annotations

from typing import Any

E2E_GOALS = {"small": 0.9, "realistic": 0.95}  # service throughput / in-process end-to-end ceiling at the target c


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


def run_to_run_noise(first: dict[str, dict], repeat: dict[str, dict]) -> dict[str, Any]:
    """The run-to-run noise of one model's single-process service in this run: at each concurrency, the
    relative spread of its two measurements, |a - b| / mean(a, b); the noise is the largest spread."""
    per: dict[str, Any] = {}
    for c, cell in first.items():
        other = repeat.get(c)
        a, b = _tput(cell), _tput(other)
        if a is None or b is None or a + b <= 0:
            continue
        per[c] = {"first": a, "repeat": b, "mean": (a + b) / 2, "spread": abs(a - b) / ((a + b) / 2)}
    return {"per_concurrency": per, "max_spread": max((v["spread"] for v in per.values()), default=None)}


def measured_workers(m: dict[str, Any]) -> list[int]:
    """Worker counts above one whose sweep was measured (not skipped) for this model."""
    return sorted(int(k) for k, v in m.get("service_workers", {}).items() if "load" in v)


def service_sweep(m: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The service sweep the targets judge: the largest worker count measured (the multi-process mode), else
    the single process; and that worker count."""
    counts = measured_workers(m)
    if counts:
        return m["service_workers"][str(counts[-1])], counts[-1]
    return m["service"], int(m["service"].get("workers", 1))


def workers_no_slower(m: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """The slowest multi-worker cell as a share of the single process's mean at the same concurrency, the
    goal (1 - the run-to-run noise) and where the slowest cell was."""
    noise = (m.get("noise") or {}).get("max_spread")
    per = (m.get("noise") or {}).get("per_concurrency", {})
    worst: tuple[float, str] | None = None
    for n in measured_workers(m):
        for c, cell in m["service_workers"][str(n)]["load"].items():
            if c not in per or not per[c]["mean"]:
                continue
            ratio = cell["throughput"] / per[c]["mean"]
            if worst is None or ratio < worst[0]:
                worst = (ratio, f"--workers {n}, c={c}")
    goal = None if noise is None else 1.0 - noise
    return (worst[0] if worst else None), goal, (worst[1] if worst else "no multi-worker cell measured")


def compute_targets(results: dict[str, Any], small: str, realistic: str | None, c: str = "32") -> dict[str, Any]:
    """Every target of the issue for which the run has the measurements (comparisons at concurrency `c`)."""
    targets: dict[str, Any] = {}
    for role, label in (("small", small), ("realistic", realistic)):
        if not label or label not in results["models"]:
            continue
        m = results["models"][label]
        sweep, workers = service_sweep(m)
        e2e = (m.get("e2e_ceiling") or {}).get("best")
        svc = _tput(sweep["load"].get(c))
        if e2e:
            targets[f"{role}_service_vs_e2e_ceiling"] = _target(
                svc / e2e["images_per_s"] if svc is not None else None,
                E2E_GOALS[role],
                True,
                f"{label}: service (--workers {workers}) at concurrency {c} / in-process end-to-end ceiling "
                f"({e2e['workers']} worker{'s' if e2e['workers'] > 1 else ''})",
            )
        if "noise" in m:
            value, goal, where = workers_no_slower(m)
            targets[f"{role}_workers_no_slower"] = _target(
                value,
                round(goal, 4) if goal is not None else 1.0,
                True,
                f"{label}: slowest multi-worker cell / single process at the same concurrency ({where}); "
                "goal: 1 - the run-to-run noise",
            )
    if realistic and realistic in results["models"]:
        r = results["models"][realistic]
        svc = _tput(service_sweep(r)[0]["load"].get(c))
        ceiling = r["ceiling"]["best"]["images_per_s"]
        targets["realistic_service_vs_ceiling"] = _target(
            svc / ceiling if svc is not None else None,
            0.95,
            True,
            f"{realistic}: service throughput at concurrency {c} / in-process encoder ceiling (tensors)",
        )
    s = results["models"][small]
    svc = _tput(service_sweep(s)[0]["load"].get(c))
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
            svc / s["ceiling"]["best"]["images_per_s"],
            0.4,
            True,
            f"{small}: service / in-process encoder ceiling (tensors), c={c}",
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
