"""The deployment files through the real validators, and the compose file as docker-compose resolves it.

The validators (docker-compose, hadolint, kubernetes-validate, promtool, nginx) run through
deploy/validate.sh, the same script CI calls. A missing validator is a failure whose message says
how to install it (the README's apt line, or the `test` extra), never a skip. The contracts between the
files that need no program are tests/unit/deploy/test_deploy_static.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from support.deploy import DEPLOY, load_tool
from support.paths import REPO
from support.programs import APT_LINE, PIP_LINE, program

VALIDATE = DEPLOY / "validate.sh"
INSTALL_HINT = f"install the validators: {APT_LINE} (system), {PIP_LINE} (hadolint, kubernetes-validate)"


render = load_tool("render")


def _validate_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLTR_PYTHON", sys.executable)
    return env


# --- the real validators -------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["compose", "dockerfile", "k8s", "prometheus", "nginx", "dashboard"])
def test_validator_passes(check: str) -> None:
    """Each deploy/validate.sh check passes (and fails loudly when its tool is missing)."""
    proc = subprocess.run(
        [program("bash", "bash"), str(VALIDATE), check],
        cwd=REPO,
        env=_validate_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    hint = f"\n{INSTALL_HINT}" if "not found" in output else ""
    assert proc.returncode == 0, f"deploy/validate.sh {check} failed:\n{output}{hint}"


def test_validate_script_rejects_unknown_check() -> None:
    proc = subprocess.run(
        ["bash", str(VALIDATE), "no-such-check"],
        cwd=REPO,
        env=_validate_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown argument" in proc.stderr


# --- docker-compose ------------------------------------------------------------------------------


def _compose_config(env_file: str | Path) -> dict[str, Any]:
    """The compose file as docker-compose resolves it with `env_file`, all profiles on."""
    exe = program("docker-compose", "docker-compose")
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
        cwd=REPO,
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
    for line in (REPO / ".env.example").read_text(encoding="utf-8").splitlines():
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
    compose_text = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    assert example["VLLTR_ADMIN_TOKEN"] not in compose_text, "a secret is written into docker-compose.yml"


def test_compose_serves_the_image_demo_unless_the_env_file_names_a_bundle(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """`cp .env.example .env && docker compose up` serves the demo built into the image; an env file that sets
    VLLTR_BUNDLE (and VLLTR_BUNDLES_SOURCE for a host folder) serves that bundle instead."""
    assert "VLLTR_BUNDLE" not in _example_env(), ".env.example must leave VLLTR_BUNDLE unset (the demo)"
    stages = load_tool("dockerfile").stages()
    apis = {**_api_services(compose), **_api_services(compose, "serve-gpu")}
    for name, svc in apis.items():
        demo = stages[svc["build"]["target"]].env()["VLLTR_BUNDLE"]
        assert svc["environment"]["VLLTR_BUNDLE"] == demo, f"{name}: with VLLTR_BUNDLE unset compose must pass {demo}"

    own = tmp_path / "own.env"
    own.write_text(
        (REPO / ".env.example").read_text(encoding="utf-8")
        + "VLLTR_BUNDLE=/bundles/current\nVLLTR_BUNDLES_SOURCE=./bundles\n",
        encoding="utf-8",
    )
    resolved = _compose_config(own)
    for name in apis:
        svc = resolved["services"][name]
        assert svc["environment"]["VLLTR_BUNDLE"] == "/bundles/current"
        assert f"{REPO / 'bundles'}:/bundles:ro" in [str(v) for v in svc["volumes"]], f"{name}: {svc['volumes']}"
    assert f"{REPO / 'bundles'}:/bundles:rw" in [str(v) for v in resolved["services"]["train"]["volumes"]]


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
    assert f"deploy/grafana/dashboards:{path}" in mounts.replace(str(REPO) + "/", "")
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
