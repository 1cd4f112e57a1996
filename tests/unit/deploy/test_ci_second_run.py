"""`.ci/run`'s second run of the server tests (`VLLTR_TEST_WORKERS=2`) leaves out exactly the test files that start
no `vlltr serve`, plus the few named here with their reason: a new server test is run in both modes without anyone
remembering to add it, and a listed file that starts servers, or no longer exists, fails here."""

from __future__ import annotations

import re

from support.paths import REPO

# What a test file uses when it starts `vlltr serve` (the fixtures and helpers of tests/support and conftest.py).
STARTS_SERVERS = re.compile(r"server_factory|ServerProcess|start_service|\"serve\"|'serve'")


def _left_out() -> set[str]:
    text = (REPO / ".ci" / "run").read_text()
    block = re.search(r"SINGLE_RUN_ONLY=\((.*?)\)", text, re.S)
    assert block, "SINGLE_RUN_ONLY is gone from .ci/run"
    assert (
        'VLLTR_TEST_WORKERS=2 python -m pytest tests/integration tests/e2e "${SINGLE_RUN_ONLY[@]/#/--ignore=}"' in text
    )
    return set(block.group(1).split())


def test_the_second_run_leaves_out_only_the_files_that_start_no_server():
    left_out = _left_out()
    files = sorted(
        str(p.relative_to(REPO)) for d in ("integration", "e2e") for p in (REPO / "tests" / d).glob("test_*.py")
    )
    assert left_out <= set(files), sorted(left_out - set(files))
    no_server = {f for f in files if not STARTS_SERVERS.search((REPO / f).read_text())}
    # test_workers.py runs `--workers 2` itself, so once is enough; the two that train a model for minutes to
    # judge its answers have their subject (the verdict, ad-hoc labels) crossing the link in other files.
    once_anyway = {
        "tests/integration/test_workers.py",
        "tests/e2e/test_unknown_images.py",
        "tests/e2e/test_zero_shot_labels.py",
        "tests/e2e/test_bench_serving.py",  # its servers' --workers are the benchmark's cells, not the variable's
    }
    assert left_out == no_server | once_anyway, (
        sorted(left_out - no_server),
        sorted(no_server - left_out),
    )
