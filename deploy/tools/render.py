"""Render the deploy/ configs for a stack running on one host without Docker.

The compose stack and the topology test must run the same nginx and Prometheus configuration;
only addresses differ (container names in compose, loopback ports in the test). This module does
that substitution and nothing else:

* nginx: deploy/nginx/templates/default.conf.template is an envsubst template (the nginx image
  renders it at start-up). ``render_nginx_site`` substitutes the same ``${VAR}`` placeholders and
  ``standalone_nginx_conf`` wraps the result in the main config the nginx image would provide,
  with every writable path under a private prefix so nginx runs without touching /etc or /var.
* Prometheus: ``render_prometheus`` points the vlltr-api job at given targets, shortens the scrape
  and evaluation intervals, drops jobs that only make sense inside compose and makes rule paths
  absolute.

Command line (used by deploy/validate.sh for ``nginx -t``):

    python deploy/tools/render.py nginx --prefix DIR --listen 127.0.0.1:8080 \\
        --upstream 127.0.0.1:8001 --upstream 127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import copy
import re
import string
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = DEPLOY_DIR / "nginx" / "templates" / "default.conf.template"
PROMETHEUS_CONFIG = DEPLOY_DIR / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES_DIR = DEPLOY_DIR / "prometheus" / "rules"
API_JOB = "vlltr-api"

# The placeholders the template uses; compose sets exactly these in the nginx container.
_PLACEHOLDER = re.compile(r"\$\{(VLLTR_[A-Z0-9_]+)\}")


def nginx_template_variables(template_text: str) -> set[str]:
    """The ``${VLLTR_*}`` placeholders a template expects."""
    return set(_PLACEHOLDER.findall(template_text))


def render_nginx_site(template_text: str, *, listen: str, upstreams: list[str]) -> str:
    """Substitute the listen address and upstream servers into the nginx site template.

    ``upstreams`` must hold one address per ``${VLLTR_API_<n>}`` placeholder, in order.
    Raises ValueError naming the placeholder when the counts do not match or one is left over.
    """
    wanted = sorted(
        (v for v in nginx_template_variables(template_text) if re.fullmatch(r"VLLTR_API_\d+", v)),
        key=lambda name: int(name.rsplit("_", 1)[1]),
    )
    if len(wanted) != len(upstreams):
        raise ValueError(
            f"the nginx template has {len(wanted)} upstream placeholders ({', '.join(wanted)}) "
            f"but {len(upstreams)} upstream addresses were given"
        )
    values = {"VLLTR_LB_LISTEN": listen}
    values.update({name: addr for name, addr in zip(wanted, upstreams)})
    # safe_substitute leaves nginx's own $host, $remote_addr... alone, as envsubst does when it is
    # given an explicit variable list.
    text = string.Template(template_text).safe_substitute(values)
    left = nginx_template_variables(text)
    if left:
        raise ValueError(f"the nginx template still has unsubstituted placeholders: {sorted(left)}")
    return text


def standalone_nginx_conf(site_conf: Path, prefix: Path) -> str:
    """A main nginx.conf that includes ``site_conf`` and keeps all state under ``prefix``.

    Mirrors the http-level defaults of the official nginx image's nginx.conf (mime types,
    sendfile, keepalive) so the site config behaves as it does in the container.
    """
    prefix = prefix.resolve()
    temp = prefix / "temp"
    # nginx creates the temp subfolders itself and, when started as root, hands them to its worker
    # user; the folders above them only need to be traversable.
    temp.mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    for folder in (prefix, temp):
        folder.chmod(0o755)
    mime_types = Path("/etc/nginx/mime.types")
    mime_line = f"    include {mime_types};" if mime_types.exists() else ""
    return "\n".join(
        [
            "worker_processes 1;",
            f"pid {prefix / 'nginx.pid'};",
            f"error_log {prefix / 'logs' / 'error.log'} info;",
            "events { worker_connections 256; }",
            "http {",
            mime_line,
            "    default_type application/octet-stream;",
            f"    access_log {prefix / 'logs' / 'access.log'};",
            "    sendfile on;",
            "    keepalive_timeout 65;",
            f"    client_body_temp_path {temp / 'client_body'};",
            f"    proxy_temp_path {temp / 'proxy'};",
            f"    fastcgi_temp_path {temp / 'fastcgi'};",
            f"    uwsgi_temp_path {temp / 'uwsgi'};",
            f"    scgi_temp_path {temp / 'scgi'};",
            f"    include {site_conf.resolve()};",
            "}",
            "",
        ]
    )


def write_nginx_prefix(prefix: Path, *, listen: str, upstreams: list[str], template: Path = NGINX_TEMPLATE) -> Path:
    """Render the site template and a standalone main config into ``prefix``; return the main config."""
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "default.conf"
    site.write_text(
        render_nginx_site(template.read_text(encoding="utf-8"), listen=listen, upstreams=upstreams),
        encoding="utf-8",
    )
    main = prefix / "nginx.conf"
    main.write_text(standalone_nginx_conf(site, prefix), encoding="utf-8")
    return main


def render_prometheus(
    config: dict[str, Any],
    *,
    targets: list[str],
    interval: str = "1s",
    rules_dir: Path = PROMETHEUS_RULES_DIR,
) -> dict[str, Any]:
    """The compose Prometheus config with the vlltr-api job scraping ``targets``.

    Keeps the job's metrics path and relabelling, labels each target ``replica: api-<n>`` as in
    compose, drops the other jobs (they address compose-only hosts) and loads every rule file in
    ``rules_dir``. Raises ValueError when the config has no vlltr-api job.
    """
    out = copy.deepcopy(config)
    glob = out.setdefault("global", {})
    glob["scrape_interval"] = interval
    glob["evaluation_interval"] = interval
    glob["scrape_timeout"] = interval
    jobs = [job for job in out.get("scrape_configs", []) if job.get("job_name") == API_JOB]
    if not jobs:
        raise ValueError(f"the Prometheus config has no scrape job named {API_JOB!r}")
    job = jobs[0]
    job["static_configs"] = [
        {"targets": [target], "labels": {"replica": f"api-{i}"}} for i, target in enumerate(targets, start=1)
    ]
    out["scrape_configs"] = [job]
    out["rule_files"] = [str(path.resolve()) for path in sorted(rules_dir.glob("*.yml"))]
    out.pop("alerting", None)
    return out


def write_prometheus_config(path: Path, *, targets: list[str], interval: str = "1s") -> Path:
    """Render deploy/prometheus/prometheus.yml for ``targets`` into ``path``."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump(render_prometheus(config, targets=targets, interval=interval)), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: render the nginx or Prometheus config into a directory and print its path."""
    parser = argparse.ArgumentParser(description="Render deploy/ configs for a local, Docker-free stack.")
    sub = parser.add_subparsers(dest="what", required=True)
    ngx = sub.add_parser("nginx", help="write DIR/nginx.conf (standalone) and DIR/default.conf (site)")
    ngx.add_argument("--prefix", type=Path, required=True, help="directory for the configs, logs and temp files")
    ngx.add_argument("--listen", required=True, help="listen address, e.g. 127.0.0.1:8080")
    ngx.add_argument("--upstream", action="append", required=True, help="replica address; repeat per replica")
    prom = sub.add_parser("prometheus", help="write a Prometheus config scraping the given targets")
    prom.add_argument("--out", type=Path, required=True, help="config file to write")
    prom.add_argument("--target", action="append", required=True, help="replica host:port; repeat per replica")
    prom.add_argument("--interval", default="1s", help="scrape and rule evaluation interval")
    args = parser.parse_args(argv)
    try:
        if args.what == "nginx":
            print(write_nginx_prefix(args.prefix, listen=args.listen, upstreams=args.upstream))
        else:
            print(write_prometheus_config(args.out, targets=args.target, interval=args.interval))
    except ValueError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
