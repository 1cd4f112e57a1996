"""Static checks of the deployment files: real validators plus the contracts between the files.

The validators (docker-compose, hadolint, kubernetes-validate, promtool, nginx) run through
deploy/validate.sh, the same script CI calls. A missing validator is a failure whose message says
how to install it (`deploy/validate.sh --install`), never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from deploy_tools import load_tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VALIDATE = DEPLOY / "validate.sh"
INSTALL_HINT = "install the validators with: bash deploy/validate.sh --install"
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
render = load_tool("render")
build_dashboard = load_tool("build_dashboard")


def _validate_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLTR_PYTHON", sys.executable)
    return env


# --- the real validators -------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["compose", "dockerfile", "k8s", "prometheus", "nginx", "dashboard"])
def test_validator_passes(check: str) -> None:
    """Each deploy/validate.sh check passes (and fails loudly when its tool is missing)."""
    if shutil.which("bash") is None:
        pytest.fail(f"bash is needed to run {VALIDATE}")
    proc = subprocess.run(
        ["bash", str(VALIDATE), check], cwd=ROOT, env=_validate_env(), capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    hint = f"\n{INSTALL_HINT}" if "not found" in output else ""
    assert proc.returncode == 0, f"deploy/validate.sh {check} failed:\n{output}{hint}"


def test_validate_script_rejects_unknown_check() -> None:
    proc = subprocess.run(
        ["bash", str(VALIDATE), "no-such-check"],
        cwd=ROOT,
        env=_validate_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown argument" in proc.stderr


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
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"onnxruntime-gpu==1.31.1"' in pyproject, (
        "the gpu extra's onnxruntime-gpu pin changed: re-check the CUDA/cuDNN the new wheel needs "
        "(its nvidia-* requirements) and update CUDA_IMAGE"
    )


def test_dockerignore_keeps_context_to_package_sources() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
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


# --- docker-compose ------------------------------------------------------------------------------


def _compose_config(env_file: str | Path) -> dict[str, Any]:
    """The compose file as docker-compose resolves it with `env_file`, all profiles on."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(f"docker-compose not found: {INSTALL_HINT} (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_") and k != "GRAFANA_ADMIN_PASSWORD"}
    proc = subprocess.run(
        [
            exe,
            "--env-file",
            str(env_file),
            "-f",
            "docker-compose.yml",
            "--profile",
            "gpu",
            "--profile",
            "train",
            "config",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with the example env file, all profiles on."""
    return _compose_config(".env.example")


def _example_env() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _api_services(compose: dict[str, Any], target: str = "serve-cpu") -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("build", {}).get("target") == target}


def test_compose_runs_two_replicas_behind_nginx(compose: dict[str, Any]) -> None:
    apis = _api_services(compose)
    assert len(apis) >= 2, f"need at least two API replicas, found {sorted(apis)}"
    for name, svc in apis.items():
        assert "profiles" not in svc, f"{name} must start by default"
        assert "ports" not in svc, f"{name} must be reached through the balancer, not published"
        assert svc.get("entrypoint") is None and svc.get("command") is None, (
            f"{name} must run the image's entrypoint (vlltr serve) unchanged"
        )
    lbs = [svc for svc in compose["services"].values() if "nginx" in str(svc.get("image", ""))]
    assert len(lbs) == 1, "expected one nginx load balancer"
    lb = lbs[0]
    template = (DEPLOY / "nginx" / "templates" / "default.conf.template").read_text(encoding="utf-8")
    placeholders = render.nginx_template_variables(template)
    assert placeholders <= set(lb["environment"]), (
        f"the balancer's environment lacks template variables {sorted(placeholders - set(lb['environment']))}"
    )
    upstreams = {lb["environment"][v] for v in placeholders if re.fullmatch(r"VLLTR_API_\d+", v)}
    assert upstreams == {f"{name}:8000" for name in apis}, (
        f"nginx upstreams {sorted(upstreams)} do not match the API replicas {sorted(apis)}"
    )
    mounts = " ".join(str(v) for v in lb.get("volumes", []))
    assert "deploy/nginx/templates" in mounts and "/etc/nginx/templates" in mounts


def test_compose_api_settings_come_from_env_file_and_shared_redis(compose: dict[str, Any]) -> None:
    example = _example_env()
    redis_services = [n for n, s in compose["services"].items() if str(s.get("image", "")).startswith("redis")]
    assert len(redis_services) == 1
    for name, svc in {**_api_services(compose), **_api_services(compose, "serve-gpu")}.items():
        env = svc["environment"]
        assert env["VLLTR_ADMIN_TOKEN"] == example["VLLTR_ADMIN_TOKEN"], (
            f"{name}: the admin token must come from the env file"
        )
        assert urlparse(env["VLLTR_REDIS_URL"]).hostname == redis_services[0]
        volumes = [str(v) for v in svc.get("volumes", [])]
        assert any("/bundles" in v for v in volumes), f"{name} does not mount the bundle volume"
    compose_text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert example["VLLTR_ADMIN_TOKEN"] not in compose_text, "a secret is written into docker-compose.yml"


def test_compose_serves_the_image_demo_unless_the_env_file_names_a_bundle(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """`cp .env.example .env && docker compose up` serves the demo built into the image; an env file that sets
    VLLTR_BUNDLE (and VLLTR_BUNDLES_SOURCE for a host folder) serves that bundle instead."""
    assert "VLLTR_BUNDLE" not in _example_env(), ".env.example must leave VLLTR_BUNDLE unset (the demo)"
    stages = dockerfile.stages()
    apis = {**_api_services(compose), **_api_services(compose, "serve-gpu")}
    for name, svc in apis.items():
        demo = stages[svc["build"]["target"]].env()["VLLTR_BUNDLE"]
        assert svc["environment"]["VLLTR_BUNDLE"] == demo, f"{name}: with VLLTR_BUNDLE unset compose must pass {demo}"

    own = tmp_path / "own.env"
    own.write_text(
        (ROOT / ".env.example").read_text(encoding="utf-8")
        + "VLLTR_BUNDLE=/bundles/current\nVLLTR_BUNDLES_SOURCE=./bundles\n",
        encoding="utf-8",
    )
    resolved = _compose_config(own)
    for name in apis:
        svc = resolved["services"][name]
        assert svc["environment"]["VLLTR_BUNDLE"] == "/bundles/current"
        assert f"{ROOT / 'bundles'}:/bundles:ro" in [str(v) for v in svc["volumes"]], f"{name}: {svc['volumes']}"
    assert f"{ROOT / 'bundles'}:/bundles:rw" in [str(v) for v in resolved["services"]["train"]["volumes"]]


def test_compose_redis_persists_with_aof_on_a_volume(compose: dict[str, Any]) -> None:
    redis = next(s for s in compose["services"].values() if str(s.get("image", "")).startswith("redis"))
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    named = set(compose.get("volumes", {}))
    assert any(str(v).split(":")[0] in named and str(v).split(":")[1] == data_dir for v in redis["volumes"]), (
        f"Redis's data dir {data_dir} must be on a named volume"
    )


def test_compose_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == render.API_JOB)
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:8000" for name in _api_services(compose)}
    prom = next(s for s in compose["services"].values() if "prometheus" in str(s.get("image", "")))
    mounts = " ".join(str(v) for v in prom["volumes"])
    assert "deploy/prometheus/prometheus.yml" in mounts and "deploy/prometheus/rules" in mounts
    gpu_jobs = [j for j in config["scrape_configs"] if j["job_name"] == "vlltr-api-gpu"]
    gpu_names = {n for j in gpu_jobs for sd in j.get("dns_sd_configs", []) for n in sd["names"]}
    assert gpu_names == set(_api_services(compose, "serve-gpu"))


def test_compose_grafana_is_provisioned(compose: dict[str, Any]) -> None:
    grafana = next(s for s in compose["services"].values() if "grafana" in str(s.get("image", "")))
    mounts = " ".join(str(v) for v in grafana["volumes"])
    assert "deploy/grafana/provisioning" in mounts and "deploy/grafana/dashboards" in mounts
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    prom_name = next(n for n, s in compose["services"].items() if "prometheus" in str(s.get("image", "")))
    assert urlparse(datasources["datasources"][0]["url"]).hostname == prom_name
    providers = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "vlltr.yml").read_text(encoding="utf-8")
    )
    path = providers["providers"][0]["options"]["path"]
    assert f"deploy/grafana/dashboards:{path}" in mounts.replace(str(ROOT) + "/", "")
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "vlltr-service.json").read_text(encoding="utf-8"))
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    used |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert used == uids, f"dashboard uses datasources {used}, provisioned are {uids}"


def test_compose_gpu_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    gpus = _api_services(compose, "serve-gpu")
    assert len(gpus) == 1
    svc = next(iter(gpus.values()))
    assert svc["profiles"] == ["gpu"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["environment"]["VLLTR_PROVIDER"] == "cuda"


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
