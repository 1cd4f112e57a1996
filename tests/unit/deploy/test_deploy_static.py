"""Static contracts between the deployment files, read in-process: the Dockerfile's serving stages, the
.dockerignore, the Kubernetes manifests, the Grafana dashboard and the Prometheus alert rules.
tests/e2e/test_deploy_static.py runs the real validators and docker-compose."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from support.deploy import DEPLOY, load_tool
from support.paths import REPO

SERVE_ENTRYPOINT = ["vlltr", "serve", "--host", "0.0.0.0", "--port", "8000"]
BUILD_TOOLS = (
    "gcc",
    "g++",
    "clang",
    "build-essential",
    "make",
    "cmake",
    "python3-dev",
    "python3-pip",
    "python3-venv",
    "git",
)


dockerfile = load_tool("dockerfile")
metric_names = load_tool("metric_names")
build_dashboard = load_tool("build_dashboard")


# --- Dockerfile ----------------------------------------------------------------------------------


def test_serving_images_run_vlltr_serve_as_non_root_with_healthcheck() -> None:
    stages = dockerfile.stages()
    for name in dockerfile.SERVING_STAGES:
        assert name in stages, f"Dockerfile lacks the {name} stage"
        stage = stages[name]
        entry = stage.last("ENTRYPOINT")
        assert entry is not None and entry.json_args() == SERVE_ENTRYPOINT, (
            f"{name} must run exactly {SERVE_ENTRYPOINT}, the command the topology test starts"
        )
        assert stage.last("CMD") is None, f"{name}: a CMD would append arguments to the serve command"
        user = stage.last("USER")
        assert user is not None, f"{name} runs as root"
        uid = user.args.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER must be a numeric non-root uid, got {user.args}"
        health = stage.last("HEALTHCHECK")
        assert health is not None and "/readyz" in health.args, f"{name} needs a HEALTHCHECK on /readyz"
        assert "8000" in [e.args for e in stage.all("EXPOSE")], f"{name} must expose port 8000"


def test_serving_images_leave_build_tools_and_torch_behind() -> None:
    stages = dockerfile.stages()
    for name in dockerfile.SERVING_STAGES:
        stage = stages[name]
        runs = " ".join(i.args for i in stage.all("RUN"))
        for tool in BUILD_TOOLS:
            assert not re.search(rf"(?<![\w.-]){re.escape(tool)}(?![\w.-])", runs), (
                f"{name} installs build tool {tool!r}; install into the builder stage instead"
            )
        assert "pip install" not in runs, f"{name} must copy a built venv, not run pip itself"
        copies = [i.args for i in stage.all("COPY")]
        assert any(c.startswith("--from=build-") and "/opt/venv" in c for c in copies), (
            f"{name} must take its venv from a build stage"
        )
        assert "torch" not in runs
    assert '".[cpu]"' in " ".join(i.args for i in stages["build-cpu"].all("RUN"))
    assert '".[gpu]"' in " ".join(i.args for i in stages["build-gpu"].all("RUN"))
    assert '".[train,cpu]"' in " ".join(i.args for i in stages["train"].all("RUN"))
    assert stages["train"].last("USER") is not None


def test_serving_images_carry_the_demo_bundle_trained_in_a_torch_stage() -> None:
    """The `demo` stage trains the demo bundle with torch in one step that deletes torch again; only the bundle
    directory reaches the serving images, where the default VLLTR_BUNDLE names it."""
    stages = dockerfile.stages()
    runs = [i.args for i in stages["demo"].all("RUN") if "vlltr.training.demo" in i.args]
    assert len(runs) == 1, "the demo stage must build the bundle with `python -m vlltr.training.demo`"
    step = runs[0]
    out = re.search(r"vlltr\.training\.demo --out (\S+)", step)
    venv = re.search(r"-m venv (\S+)", step)
    removed = re.search(r"rm -rf ([^&]+)$", step)
    assert out and venv and removed, f"unexpected demo step: {step}"
    assert '".[train,cpu]"' in step and f"{venv.group(1)}/bin/pip install" in step
    assert venv.group(1) in removed.group(1).split(), "the demo step must delete its torch venv, or a layer keeps it"
    for name in dockerfile.SERVING_STAGES:
        stage = stages[name]
        copies = [c.args.split() for c in stage.all("COPY") if c.args.startswith("--from=demo ")]
        assert copies == [["--from=demo", out.group(1), stage.env()["VLLTR_BUNDLE"]]], (
            f"{name} must copy the demo bundle to its default VLLTR_BUNDLE"
        )
        bundle = stage.env()["VLLTR_BUNDLE"]
        # Mounts (bundles, and writable state on a read-only root) must not hide it.
        for mount_point in (
            "/bundles",
            stage.env()["VLLTR_CACHE_DIR"],
            str(Path(stage.env()["VLLTR_CLASS_STORE"]).parent),
        ):
            assert not (bundle + "/").startswith(mount_point.rstrip("/") + "/"), f"{name}: {bundle} under {mount_point}"


def test_gpu_image_is_built_on_a_cuda_cudnn_runtime_base() -> None:
    args = dockerfile.build_args()
    stages = dockerfile.stages()
    assert stages["serve-gpu"].base == "${CUDA_IMAGE}"
    image = args["CUDA_IMAGE"]
    # onnxruntime-gpu 1.31.1's wheel requires nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0.
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", image)
    assert match, f"CUDA_IMAGE {image!r} is not an nvidia/cuda cudnn runtime image"
    assert match.group(1) == "13", f"onnxruntime-gpu 1.31.1 needs CUDA 13, the base has CUDA {match.group(1)}"
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"onnxruntime-gpu==1.31.1"' in pyproject, (
        "the gpu extra's onnxruntime-gpu pin changed: re-check the CUDA/cuDNN the new wheel needs "
        "(its nvidia-* requirements) and update CUDA_IMAGE"
    )


def test_dockerignore_keeps_context_to_package_sources() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore should exclude everything first and allow the build inputs back"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied: set[str] = set()
    for stage in dockerfile.stages().values():
        for inst in stage.all("COPY"):
            if inst.args.startswith("--from"):
                continue
            # A path inside an allowed folder is allowed with it.
            copied.update(src.rstrip("/").split("/")[0] for src in inst.args.split()[:-1])
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {sorted(copied - allowed)}"


# --- Kubernetes ----------------------------------------------------------------------------------


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def test_k8s_manifests_wire_together() -> None:
    docs = _k8s_docs()
    deployment = _one(docs, "Deployment", "vlltr-api")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert "command" not in container and "args" not in container, "pods must run the image's vlltr serve"
    assert container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    sources = {next(iter(ref.values()))["name"]: next(iter(ref)) for ref in container["envFrom"]}
    config = _one(docs, "ConfigMap", _envfrom_name(sources, "configMapRef"))
    secret = _one(docs, "Secret", _envfrom_name(sources, "secretRef"))
    assert "VLLTR_ADMIN_TOKEN" in secret.get("stringData", {}) | secret.get("data", {})
    assert "VLLTR_ADMIN_TOKEN" not in config["data"], "the admin token belongs in the Secret"

    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = _one(docs, "Service", "vlltr-api")
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler", "vlltr-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vlltr-api"}
    assert hpa["spec"]["minReplicas"] >= 2

    redis_host = urlparse(config["data"]["VLLTR_REDIS_URL"]).hostname
    redis_service = _one(docs, "Service", redis_host)
    statefulset = _one(docs, "StatefulSet", "vlltr-redis")
    assert redis_service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    claims = statefulset["spec"]["volumeClaimTemplates"]
    mounts = statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == claims[0]["metadata"]["name"] and m["mountPath"] == "/data" for m in mounts)
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"

    bundle_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/bundles")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == bundle_mount["name"])
    _one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert config["data"]["VLLTR_BUNDLE"].startswith("/bundles/")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "vlltr", f"{doc['kind']} {doc['metadata']['name']}"


def _envfrom_name(sources: dict[str, str], kind: str) -> str:
    """The name of the envFrom source of the given kind (configMapRef or secretRef)."""
    names = [name for name, k in sources.items() if k == kind]
    assert len(names) == 1, f"expected one {kind} in envFrom, found {names}"
    return names[0]


def test_k8s_gpu_pods_stay_out_of_the_cpu_deployment() -> None:
    docs = _k8s_docs()
    cpu = _one(docs, "Deployment", "vlltr-api")
    gpu = _one(docs, "Deployment", "vlltr-api-gpu")
    gpu_labels = gpu["spec"]["template"]["metadata"]["labels"]
    assert not cpu["spec"]["selector"]["matchLabels"].items() <= gpu_labels.items(), (
        "the CPU Deployment's selector (and so its HPA) would count the GPU pods"
    )
    limits = gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == "1"


# --- dashboard and alert rules -------------------------------------------------------------------


def test_dashboard_is_generated_and_laid_out() -> None:
    path = DEPLOY / "grafana" / "dashboards" / "vlltr-service.json"
    assert path.read_text(encoding="utf-8") == build_dashboard.render(), (
        "the dashboard JSON differs from deploy/tools/build_dashboard.py: run it"
    )
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} overflows the grid"
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"


def test_alert_rules_cover_the_required_conditions() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "vlltr-alerts.yml").read_text(encoding="utf-8"))
    by_metric: dict[str, list[str]] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule.get("alert") and rule.get("annotations", {}).get("summary"), rule
            assert rule["labels"]["severity"] in ("warning", "critical")
            for name in metric_names.names_in_promql(rule["expr"]):
                by_metric.setdefault(name, []).append(rule["alert"])
    expr_text = json.dumps(rules)
    assert "vlltr_request_duration_seconds_count" in by_metric and 'status=~\\"5..\\"' in expr_text, "error rate"
    assert "histogram_quantile(0.99" in expr_text and "vlltr_request_duration_seconds_bucket" in by_metric, "p99"
    assert "vlltr_queue_depth" in by_metric and "vlltr_queue_capacity" in by_metric, "queue saturation"
    assert "vlltr_redis_up" in by_metric, "Redis down"


def test_dashboard_and_rule_metrics_exist_in_the_service_registry() -> None:
    """Cheap in-process twin of the live check in test_deploy_topology.py."""
    from vlltr.service.metrics import Metrics

    body, _ = Metrics(redis_enabled=True).exposition()
    exposed = metric_names.exposed_names(body.decode())
    used = metric_names.used_names(
        [DEPLOY / "grafana" / "dashboards" / "vlltr-service.json"],
        sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")),
    )
    assert used, "no vlltr_* metric found in the dashboard or rules"
    missing = {name: sorted(files) for name, files in used.items() if name not in exposed}
    assert not missing, f"metrics used by deploy/ but not exported by service.metrics: {missing}"


def test_metric_name_extraction_ignores_label_values() -> None:
    expr = 'sum(rate(vlltr_a_total{job="vlltr_not_a_metric"}[5m])) / on() vlltr_b{x=~"vlltr_c.*"}'
    assert metric_names.names_in_promql(expr) == {"vlltr_a_total", "vlltr_b"}
