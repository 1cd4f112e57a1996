"""Render docs/reliability.md from the reliability tests' JSON summary (and optionally a full soak's).

    VLLTR_RELIABILITY_SUMMARY=build/reliability.json python -m pytest -k test_reliability_
    python -m bench.soak --bundle DIR --summary build/soak.json          # optional: the full soak
    python -m bench.soak.report build/reliability.json [--soak build/soak.json] [--out docs/reliability.md]

Every figure in the document comes from those files; the list of guarantees and the tests that check them
is kept here, next to the code that fills it in, so a guarantee whose tests did not run shows as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# (guarantee, tests that check it: node-id prefixes from the test file's name on, e.g. `test_reliability_x.py::test_y`;
# the files sit in tests/unit, tests/integration and tests/e2e by what they need)
GUARANTEES: list[tuple[str, list[str]]] = [
    (
        "Every hostile image (empty, truncated, mislabelled, decompression bombs, extreme shapes, animated, 16-bit, "
        "CMYK, palette with transparency, EXIF-rotated, SVG/PDF/HEIC and other unsupported types) gets a prediction "
        "or its 4xx with the JSON error envelope, alone or inside a batch; never a 5xx",
        [
            "test_reliability_images.py::test_hostile_image_gets_a_defined_answer",
            "test_reliability_images.py::test_hostile_images_fail_alone_inside_one_batch",
            "test_reliability_images.py::test_no_hostile_image_was_ever_answered_5xx",
        ],
    ),
    (
        "Multi-frame images are classified by their first frame; EXIF orientation is applied",
        [
            "test_reliability_images.py::test_animated_gif_is_classified_by_its_first_frame",
            "test_reliability_images.py::test_exif_orientation_is_applied",
        ],
    ),
    (
        "Memory stays bounded under a barrage of hostile images (RSS measured on the server process)",
        ["test_reliability_images.py::test_memory_stays_bounded_under_a_hostile_barrage"],
    ),
    (
        "Request bodies held in memory at once are bounded by `max_buffered_bytes`: a flood of large uploads gets "
        "503 + Retry-After beyond it (whole requests admitted or refused, so none starves), every byte is given "
        "back, and one request larger than the budget gets 413",
        ["test_reliability_images.py::test_concurrent_large_uploads_are_bounded_by_the_body_budget"],
    ),
    (
        "Hostile class uploads (empty, 10 MB, invalid UTF-8, control characters, path separators, 10,000-character "
        "names, JSON bombs) are refused with their 4xx; names with Redis glob characters are stored and deleted "
        "literally",
        [
            "test_reliability_uploads.py::test_hostile_class_upload_is_refused_with_its_4xx",
            "test_reliability_uploads.py::test_hostile_names_on_delete_are_refused_with_4xx",
            "test_reliability_uploads.py::test_utf8_bom_and_crlf_files_are_accepted",
            "test_reliability_uploads.py::test_server_survived_every_hostile_upload",
            "test_reliability_uploads.py::test_redis_glob_characters_in_names_are_taken_literally",
        ],
    ),
    (
        "A class name raced on two replicas has exactly one winner and both replicas agree (Redis store and "
        "shared-file store)",
        ["test_reliability_uploads.py::test_duplicate_name_racing_on_two_replicas_has_one_winner_both_agree"],
    ),
    (
        "Every operation of the OpenAPI document, fuzzed with valid and invalid requests (schemathesis), answers "
        "without a 5xx, with a documented status, content type, headers and body schema",
        ["test_reliability_schema.py::"],
    ),
    (
        "Micro-batcher: under random arrivals, cancellations, failing items, wrong-length results and stops, every "
        "request is answered exactly once with its own outcome, batches respect their size, order is kept, no "
        "partial batch leaves before its oldest item's deadline, the queue bound holds and the loop survives (or "
        "is restarted and fails its batch instead of hanging)",
        ["test_reliability_batcher.py::"],
    ),
    (
        "Slow clients cannot hold the service: 2,000 uploads stalled after their headers and one line of body are "
        "all answered 408 and closed after the body read timeout while other requests keep their latency (median "
        "within 2x unloaded); a stalled or trickled request head gets 408 and is closed at the header deadline; "
        "past `max_connections` a new connection is answered 503 at once and closed",
        ["test_reliability_slow_clients.py::"],
    ),
    (
        "Redis killed and restarted under load: no classification fails, the cache resumes by itself, added "
        "classes and the table version survive (append-only file), class changes during the outage get 503 with "
        "Retry-After",
        ["test_reliability_faults.py::test_redis_killed_and_restarted_under_load"],
    ),
    (
        "A class added during a rolling restart is on every replica afterwards; replicas shut down cleanly",
        ["test_reliability_faults.py::test_class_added_during_rolling_restart_is_on_every_replica"],
    ),
    (
        "One replica killed behind nginx: requests continue through the other (only requests the dead replica "
        "held at the moment of the kill can fail)",
        ["test_reliability_faults.py::test_one_replica_killed_behind_the_balancer"],
    ),
    (
        "SIGTERM during load: in-flight requests finish, new connections are refused, the process exits within "
        "the grace period (releasing resources is bounded too, and a release that hangs is logged with stacks)",
        [
            "test_reliability_faults.py::test_sigterm_during_load_drains_in_flight_and_refuses_new",
            "test_reliability_faults.py::test_a_hanging_release_cannot_hold_shutdown_past_its_bound",
            "test_reliability_faults.py::test_class_sync_stops_even_when_a_store_call_absorbs_the_cancellation",
        ],
    ),
    (
        "Class changes without the token get 401, with a wrong one 403, before the body is read; reads need none",
        [
            "test_reliability_auth.py::test_class_changes_without_the_right_token_are_refused",
            "test_reliability_auth.py::test_auth_is_checked_before_the_body_is_read",
            "test_reliability_auth.py::test_the_right_token_works_and_reads_need_none",
        ],
    ),
    (
        "The token comparison is constant-time (hmac.compare_digest alone decides)",
        ["test_reliability_auth.py::test_token_comparison_is_constant_time"],
    ),
    (
        "No secret (admin token, Redis password) in logs, responses, metrics, CLI help or CLI errors",
        [
            "test_reliability_auth.py::test_secrets_never_appear_in_logs_responses_or_metrics",
            "test_reliability_auth.py::test_cli_help_and_errors_do_not_echo_secrets",
        ],
    ),
    (
        "Soak: zero errors at concurrency 32 and RSS growth after warm-up within the stated bound (64 MiB in the "
        "tests; `--rss-bound-mb` for `python -m bench.soak`)",
        ["test_reliability_soak.py::"],
    ),
]

THEME_ORDER = ["hostile images", "hostile uploads", "schema fuzzing", "batcher properties", "faults", "auth", "soak"]


def _from_file_name(node_id: str) -> str:
    """`tests/integration/test_reliability_x.py::test_y[p]` -> `test_reliability_x.py::test_y[p]`."""
    path, sep, rest = node_id.partition("::")
    return path.rsplit("/", 1)[-1] + sep + rest


def _outcomes_for(outcomes: dict[str, str], prefixes: list[str]) -> tuple[int, int, int]:
    matched = [o for node, o in outcomes.items() for p in prefixes if _from_file_name(node).startswith(p)]
    return (
        sum(o == "passed" for o in matched),
        sum(o == "failed" for o in matched),
        sum(o == "skipped" for o in matched),
    )


def _status(passed: int, failed: int, skipped: int) -> str:
    if failed:
        return f"FAILED ({failed} failed, {passed} passed)"
    if not passed:
        return "not run" if not skipped else f"skipped ({skipped})"
    return f"passed ({passed})" + (f", {skipped} skipped" if skipped else "")


def _int(value: Any) -> str:
    return f"{int(value):,}"


def _soak_lines(title: str, soak: dict[str, Any]) -> list[str]:
    rss, load = soak["rss_mb"], soak["load"]
    return [
        f"**{title}:** {_int(soak['requests'])} measured requests (after {_int(soak['warmup_requests'])} warm-up) "
        f"at concurrency {soak['concurrency']} over {soak['distinct_images']} distinct images: "
        f"{_int(soak['errors'])} errors, {load['requests_per_s']} requests/s, latency p50 "
        f"{load['latency_ms']['p50']} ms, p99 {load['latency_ms']['p99']} ms. Server RSS {rss['baseline']} MiB after "
        f"warm-up, peak {rss['peak']} MiB, final {rss['final']} MiB: growth {rss['growth_peak']} MiB at the peak, "
        f"{rss['growth_final']} MiB at the end (bound {rss['bound']} MiB, {rss['samples']} samples). "
        f"{'Passed.' if soak['passed'] else 'FAILED.'}",
        "",
    ]


def render(summary: dict[str, Any], soak: dict[str, Any] | None = None) -> str:
    """The Markdown of docs/reliability.md."""
    outcomes: dict[str, str] = summary.get("outcomes", {})
    themes: dict[str, dict[str, float]] = summary.get("themes", {})
    totals = summary.get("totals", {})
    passed = sum(o == "passed" for o in outcomes.values())
    failed = sum(o == "failed" for o in outcomes.values())
    lines = [
        "# Reliability and security",
        "",
        "What the service guarantees under hostile input, faults and load, the test that checks each guarantee,",
        "and the figures of the last run. This file is generated; do not edit it by hand:",
        "",
        "```bash",
        "VLLTR_RELIABILITY_SUMMARY=build/reliability.json python -m pytest -k test_reliability_",
        "python -m bench.soak --bundle BUNDLE_DIR --summary build/soak.json   # optional: the full 50,000-request soak",
        "python -m bench.soak.report build/reliability.json --soak build/soak.json --out docs/reliability.md",
        "```",
        "",
        "`python -m pytest` (and so `.ci/run`) runs all of these tests, the soak in its reduced form;",
        "`python -m pytest --soak` runs the full soak instead.",
        "",
        f"Last run: {summary.get('generated', '?')}, {passed} reliability tests passed, {failed} failed.",
        "",
        "## Guarantees",
        "",
        "| guarantee | checked by | last run |",
        "|---|---|---|",
    ]
    for text, prefixes in GUARANTEES:
        shown = "<br>".join(f"`{p.rstrip(':')}`" for p in prefixes)
        lines.append(f"| {text} | {shown} | {_status(*_outcomes_for(outcomes, prefixes))} |")
    lines += [
        "",
        "## Figures of the last run",
        "",
        "Requests are HTTP requests the tests sent to real `vlltr serve` processes (through real nginx where a "
        "balancer is involved); inputs are distinct hostile inputs tried; faults are processes killed, stopped or "
        "signalled, or dependencies taken away; errors are 5xx answers or transport failures the guarantee does "
        "not allow; data lost counts added classes missing after a fault.",
        "",
        "| theme | requests served | faults injected | inputs tried | errors | data lost |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for theme in THEME_ORDER + sorted(set(themes) - set(THEME_ORDER)):
        row = themes.get(theme)
        if row is None:
            continue
        lines.append(
            f"| {theme} | {_int(row['requests'])} | {_int(row['faults'])} | {_int(row['inputs'])} | "
            f"{_int(row['errors'])} | {_int(row['data_lost'])} |"
        )
    if totals:
        lines.append(
            f"| **total** | **{_int(totals['requests'])}** | **{_int(totals['faults'])}** | "
            f"**{_int(totals['inputs'])}** | **{_int(totals['errors'])}** | **{_int(totals['data_lost'])}** |"
        )
    lines.append("")
    details = summary.get("details", {})
    if "hostile images RSS growth MiB (peak, final)" in details:
        peak, final = details["hostile images RSS growth MiB (peak, final)"]
        lines += [
            f"**Hostile images, memory:** server RSS grew by {peak} MiB at the peak of the barrage and stayed "
            f"{final} MiB above its warmed-up baseline afterwards (pixel budget 4 megapixels, two decode "
            f"threads).",
            "",
        ]
    flood = details.get("large concurrent uploads: RSS growth MiB, answers")
    if flood is not None:
        growth, statuses = flood
        lines += [
            f"**Large concurrent uploads:** 16 batch uploads of 16 MiB at once against a 40 MiB body budget: "
            f"{statuses.count(200)} answered 200, {statuses.count(503)} answered 503 + Retry-After; server RSS "
            f"grew by {growth} MiB (256 MiB of bodies would have been held without the budget).",
            "",
        ]
    bounded = details.get("shutdowns that needed the release bound")
    if bounded is not None:
        lines += [
            f"**Graceful stops:** {_int(bounded)} of the stops in the fault tests needed the app's bound on "
            f"releasing resources (the stacks of what was still running are logged when it fires).",
            "",
        ]
    held = details.get("replica kill: requests held by the killed replica that failed")
    if held is not None:
        lines += [
            f"**Replica killed behind nginx:** {_int(held)} requests that the killed replica held at the instant "
            f"of the SIGKILL failed (see the known limits); none before or after it.",
            "",
        ]
    if "soak" in details:
        lines += _soak_lines("Soak in the test run", details["soak"])
    if soak is not None:
        lines += _soak_lines("Full soak (`python -m bench.soak`)", soak)
    lines += [
        "## Known limits",
        "",
        "- nginx never replays a POST on another replica (`proxy_next_upstream` without `non_idempotent`), so a "
        "classification held by a replica at the instant it is killed fails (502, or a cut connection when the "
        "answer was already being relayed); requests sent afterwards "
        "go to the surviving replica. Graceful stops (SIGTERM) drain instead and lose nothing. Classification is "
        "safe to repeat, so `proxy_next_upstream ... non_idempotent` on the `/v1/classify` locations would remove "
        "even those (class changes must stay unreplayed).",
        "- After a graceful shutdown `vlltr serve` ends by re-raising the SIGTERM it caught (uvicorn's behaviour), "
        "so its exit status is 143 / -15 rather than 0.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("summary", type=Path, help="JSON written by the tests (VLLTR_RELIABILITY_SUMMARY)")
    parser.add_argument("--soak", type=Path, help="JSON written by `python -m bench.soak --summary`")
    parser.add_argument("--out", type=Path, default=Path("docs/reliability.md"), help="the document to write")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    soak = json.loads(args.soak.read_text(encoding="utf-8")) if args.soak else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(summary, soak), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
