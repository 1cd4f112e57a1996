"""A bounded soak against a real `vlltr serve`: many classifications at concurrency 32 with zero errors, and the
server's resident memory does not grow past a stated bound once warmed up.

The default run is a reduced soak (2,000 measured requests); `python -m pytest --soak` runs the full one
(50,000), as does `python -m bench.soak`. The embedding cache is set smaller than the set of distinct images,
so it is full and evicting during the measured phase: its bound is part of what is measured.
"""

from __future__ import annotations

from bench.soak.load import make_images
from bench.soak.soak import soak

CONCURRENCY = 32
RSS_BOUND_MB = 64.0
REDUCED = {"requests": 2_000, "warmup": 400}
FULL = {"requests": 50_000, "warmup": 5_000}


def test_soak_has_no_errors_and_bounded_memory(
    request, service_bundle, server_factory, tmp_path_factory, reliability_log
):
    plan = FULL if request.config.getoption("--soak") else REDUCED
    srv = server_factory(
        args=["--bundle", str(service_bundle), "--cache-size", "256"], workdir=tmp_path_factory.mktemp("soak")
    )
    try:
        result = soak(
            srv.url,
            srv.pid,
            requests=plan["requests"],
            warmup=plan["warmup"],
            concurrency=CONCURRENCY,
            images=make_images(512, seed=3),
            rss_bound_mb=RSS_BOUND_MB,
        )
        alive = srv.alive()
    finally:
        srv.stop()
    reliability_log.add("soak", requests=result["requests"] + result["warmup_requests"], errors=result["errors"])
    reliability_log.note("soak", result)
    assert alive
    assert result["errors"] == 0, result["load"]["error_reasons"]
    assert result["load"]["ok"] == plan["requests"]
    rss = result["rss_mb"]
    assert rss["growth_peak"] <= RSS_BOUND_MB and rss["growth_final"] <= RSS_BOUND_MB, rss
    assert result["passed"]


def test_every_reliability_test_backs_a_guarantee_in_the_report():
    # docs/reliability.md is rendered from bench.soak.report's list of guarantees: a reliability test that no
    # guarantee names would run without ever being reported.
    import ast

    from bench.soak.report import GUARANTEES
    from support.paths import TESTS
    from support.reliability import RELIABILITY_PREFIX

    prefixes = [p for _, tests in GUARANTEES for p in tests]
    unlisted = []
    paths = sorted(TESTS.rglob(f"{RELIABILITY_PREFIX}*.py"))
    assert {p.parent.name for p in paths} >= {"service", "integration", "e2e"}, paths  # every kind was found
    for path in paths:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                node_id = f"{path.name}::{node.name}"
                if not any(node_id.startswith(p) for p in prefixes):
                    unlisted.append(node_id)
    assert not unlisted, unlisted
