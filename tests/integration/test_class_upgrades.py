"""Added classes survive model upgrades and move between deployments (real `vlltr serve` processes).

* A run exported twice (two bundle ids) and a retrained run (another seed): 50 classes added on the first are
  all served after restarting onto each of the others, scored with that bundle's features exactly as if they
  had been added fresh there.
* Two replicas sharing Redis, restarted one at a time onto a new bundle: every answer of every replica lists
  every added class throughout.
* `vlltr classes export` then `import` moves 1,000 classes between deployments on different bundles, through
  the HTTP service and through the stores directly.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import httpx
import pytest

from support.paths import PYTHON, REPO

TOKEN = "upgrade-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _classes_to_add(n: int, tag: str = "") -> list[dict]:
    colours = ["crimson", "teal", "ochre", "violet", "amber", "slate", "olive", "coral"]
    shapes = ["spiral", "lattice", "crescent", "chevron", "ripple", "prism"]
    out = []
    for i in range(n):
        c, s = colours[i % len(colours)], shapes[(i // len(colours)) % len(shapes)]
        descriptions = [f"a {c} {s} pattern", f"{s} shapes drawn in {c}"]
        if i % 5 == 0:  # more descriptions than anchor slots: the name and the other classes choose the anchors
            descriptions += [f"a photo of {c} {s}s", f"many small {s}s", f"{c} paint", f"the number {i}"]
        out.append({"name": f"added {tag}{i} {c} {s}", "descriptions": descriptions})
    return out


CLASSES = _classes_to_add(50)


def _add_fifty(url: str) -> None:
    """10 classes one by one, then 40 in one bulk request."""
    with httpx.Client(base_url=url, timeout=120, headers=AUTH) as c:
        for item in CLASSES[:10]:
            r = c.post("/v1/classes", json=item)
            assert r.status_code == 201, r.text
        r = c.post("/v1/classes/bulk", json={"classes": CLASSES[10:]})
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()["results"]] == [201] * 40, r.text


def _wd(root, name: str):
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _added(url: str) -> list[str]:
    r = httpx.get(f"{url}/v1/classes", timeout=30)
    assert r.status_code == 200, r.text
    return [c["name"] for c in r.json()["classes"] if c["source"] == "added"]


def _images(bundle, n=3) -> list[bytes]:
    data = bundle.parent / "run" / "data"
    lines = [line for line in (data / "test.txt").read_text().split("\n") if line][:n]
    return [(data / line.split()[0]).read_bytes() for line in lines]


def _scores(url: str, image: bytes) -> dict[str, float]:
    r = httpx.post(f"{url}/v1/classify", params={"top_k": 100}, files={"file": ("x.png", image)}, timeout=60)
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()["predictions"]}


@pytest.fixture(scope="module")
def bundles(service_bundle, tmp_path_factory):
    """(first, the same run exported again, a retrained run): three bundle ids, the same trained class names."""
    from support.runs import make_run
    from vlltr.model.runtime.bundle import load_bundle
    from vlltr.training.export import export_bundle

    root = tmp_path_factory.mktemp("upgrades")
    again = export_bundle(service_bundle.parent / "run", root / "again" / "bundle")
    if load_bundle(again).bundle_id == load_bundle(service_bundle).bundle_id:  # exported within the same second
        time.sleep(1.1)
        again = export_bundle(service_bundle.parent / "run", root / "again2" / "bundle")
    (root / "again" / "run").symlink_to(service_bundle.parent / "run")
    retrained = export_bundle(make_run(root / "retrained" / "run", seed=1), root / "retrained" / "bundle")
    ids = {load_bundle(b).bundle_id for b in (service_bundle, again, retrained)}
    assert len(ids) == 3
    return service_bundle, again, retrained


def test_added_classes_survive_an_export_of_the_same_run_and_a_retrained_run(bundles, server_factory, tmp_path):
    first, again, retrained = bundles
    store = tmp_path / "classes.jsonl"
    env = {"VLLTR_CLASS_STORE": str(store), "VLLTR_ADMIN_TOKEN": TOKEN}
    server = server_factory(env=env, args=["--bundle", str(first)], workdir=_wd(tmp_path, "first"))
    _add_fifty(server.url)
    expected = [c["name"] for c in CLASSES]
    assert _added(server.url) == expected
    server.stop()
    for n, bundle in enumerate((again, retrained)):
        upgraded = server_factory(env=env, args=["--bundle", str(bundle)], workdir=_wd(tmp_path, f"up-{n}"))
        assert _added(upgraded.url) == expected  # ready means every added class is served
        assert "deriving 50 added classes for bundle" in upgraded.log(tail=None)
        fresh_env = {"VLLTR_CLASS_STORE": str(tmp_path / f"fresh-{n}.jsonl"), "VLLTR_ADMIN_TOKEN": TOKEN}
        fresh = server_factory(env=fresh_env, args=["--bundle", str(bundle)], workdir=_wd(tmp_path, f"fresh-{n}"))
        _add_fifty(fresh.url)
        for image in _images(bundle):
            got, want = _scores(upgraded.url, image), _scores(fresh.url, image)
            assert got.keys() == want.keys() and len(got) == 56
            for label in want:
                assert got[label] == pytest.approx(want[label], abs=1e-5), label
        upgraded.stop()
        fresh.stop()


def test_a_rolling_restart_onto_a_new_bundle_serves_the_added_classes_throughout(
    bundles, server_factory, redis_server_factory, tmp_path
):
    first, _, retrained = bundles
    redis = redis_server_factory()
    env = {"VLLTR_REDIS_URL": redis.url, "VLLTR_ADMIN_TOKEN": TOKEN, "VLLTR_REDIS_PREFIX": "rolling"}
    replicas = [
        server_factory(env=env, args=["--bundle", str(first)], workdir=_wd(tmp_path, f"replica-{i}")) for i in range(2)
    ]
    _add_fifty(replicas[0].url)
    expected = [c["name"] for c in CLASSES]
    for r in replicas:
        deadline = time.monotonic() + 5
        while _added(r.url) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
    answers: list[tuple[int, list[str]]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                for i, r in enumerate(replicas):
                    try:
                        resp = c.get(f"{r.url}/v1/classes")
                    except httpx.HTTPError:
                        continue  # the replica being restarted is down
                    if resp.status_code == 200:
                        answers.append((i, [x["name"] for x in resp.json()["classes"] if x["source"] == "added"]))
                    else:
                        assert resp.status_code == 503, resp.text  # starting: not serving yet
                time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        for r in replicas:
            r.stop()
            r.args = ["--bundle", str(retrained)]
            r.start()
            assert _added(r.url) == expected
    finally:
        stop.set()
        poller.join(30)
    assert {i for i, _ in answers} == {0, 1} and len(answers) > 20
    wrong = [(i, len(names)) for i, names in answers if names != expected]
    assert wrong == [], wrong[:5]
    for r in replicas:
        assert httpx.get(f"{r.url}/v1/model", timeout=10).json()["bundle_id"] != ""
        r.stop()


def _cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if token:
        env["VLLTR_ADMIN_TOKEN"] = token
    return subprocess.run(
        [PYTHON, "-m", "vlltr.cli", "classes", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_export_then_import_moves_a_thousand_classes_between_deployments_on_different_bundles(
    bundles, server_factory, redis_server_factory, tmp_path
):
    first, _, retrained = bundles
    redis = redis_server_factory()
    prefix = f"export-{uuid.uuid4().hex[:8]}"
    source = server_factory(
        env={"VLLTR_REDIS_URL": redis.url, "VLLTR_REDIS_PREFIX": prefix, "VLLTR_ADMIN_TOKEN": TOKEN},
        args=["--bundle", str(first)],
        workdir=_wd(tmp_path, "source"),
    )
    thousand = _classes_to_add(1000, tag="t")
    with httpx.Client(base_url=source.url, timeout=300, headers=AUTH) as c:
        for start in (0, 500):
            r = c.post("/v1/classes/bulk", json={"classes": thousand[start : start + 500]})
            assert r.status_code == 200 and r.json()["created"] == 500, r.text[:500]
    names = [c["name"] for c in thousand]
    assert _added(source.url) == names

    # Through the services: export from one, import into another on another bundle (and another store kind).
    exported = tmp_path / "classes-export.jsonl"
    done = _cli("export", str(exported), "--url", source.url, token=TOKEN)
    assert done.returncode == 0 and "exported 1000 classes" in done.stderr, done.stderr
    target = server_factory(
        env={"VLLTR_CLASS_STORE": str(tmp_path / "target.jsonl"), "VLLTR_ADMIN_TOKEN": "another-token"},
        args=["--bundle", str(retrained)],
        workdir=_wd(tmp_path, "target"),
    )
    done = _cli("import", str(exported), "--url", target.url, "--token", "another-token")
    assert done.returncode == 0, done.stderr
    assert "1000 classes added, 0 already there, 0 not imported" in done.stderr
    assert _added(target.url) == names
    listed = httpx.get(f"{target.url}/v1/classes", timeout=30).json()["classes"]
    assert all(c["anchors"] and c["added_by"].startswith("token:") for c in listed if c["source"] == "added")
    done = _cli("import", str(exported), "--url", target.url, "--token", "another-token")  # again: a no-op
    assert done.returncode == 0 and "0 classes added, 1000 already there" in done.stderr, done.stderr

    # Through the stores directly: Redis -> a class-store file, then a service starts on it.
    direct = tmp_path / "direct-export.jsonl"
    done = _cli("export", str(direct), "--redis-url", redis.url, "--redis-prefix", prefix)
    assert done.returncode == 0 and "exported 1000 classes" in done.stderr, done.stderr
    done = _cli("import", str(direct), "--class-store", str(tmp_path / "direct.jsonl"))
    assert done.returncode == 0 and "1000 classes added" in done.stderr, done.stderr
    started = time.monotonic()
    third = server_factory(
        env={"VLLTR_CLASS_STORE": str(tmp_path / "direct.jsonl")},
        args=["--bundle", str(retrained)],
        workdir=_wd(tmp_path, "third"),
    )
    took = time.monotonic() - started
    assert _added(third.url) == names
    assert "deriving 1000 added classes" in third.log(tail=None)
    print(f"a replica deriving 1000 added classes started in {took:.1f} s")
    for server in (source, target, third):
        server.stop()
