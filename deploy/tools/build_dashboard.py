"""Write the Grafana dashboard for the vlltr service (deploy/grafana/dashboards/vlltr-service.json).

The dashboard is generated rather than hand-edited so panel layout, datasource references and
queries stay consistent; tests/unit/deploy/test_deploy_static.py fails when the committed JSON differs from
what this script produces. Run it after changing a panel:

    python deploy/tools/build_dashboard.py
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE_UID = "vlltr-prometheus"
DASHBOARD_UID = "vlltr-service"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "grafana" / "dashboards" / "vlltr-service.json"

DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
# Every query is narrowed to the replicas picked in the dashboard's variables.
SEL = 'job=~"$job", instance=~"$instance"'
API_ROUTES = 'route!~"/healthz|/readyz|/metrics"'


@dataclass
class Target:
    """One PromQL query of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass
class Panel:
    """A dashboard panel before layout: kind, title, queries and display options."""

    kind: str
    title: str
    targets: list[Target]
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    stack: bool = False
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)
    decimals: int | None = None


def _target_json(target: Target, ref: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "datasource": DATASOURCE,
        "expr": target.expr,
        "legendFormat": target.legend or "__auto",
        "refId": ref,
        "range": not target.instant,
        "instant": target.instant,
    }
    if target.table:
        out["format"] = "table"
    return out


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in panel.thresholds] or [
        {"color": "green", "value": None}
    ]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "color": {"mode": "thresholds" if panel.kind == "stat" else "palette-classic"},
    }
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    elif panel.kind == "table":
        options = {"showHeader": True, "cellHeight": "sm"}
    else:
        options = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [_target_json(t, chr(ord("A") + i)) for i, t in enumerate(panel.targets)],
    }
    if panel.kind == "table":
        out["transformations"] = [
            {"id": "labelsToFields", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            },
        ]
    return out


def _row_json(title: str, panel_id: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }


def _quantile(q: float, metric: str, by: str = "", extra: str = "") -> str:
    labels = f"{SEL}, {extra}" if extra else SEL
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{labels}}}[$__rate_interval])))"


def sections() -> list[tuple[str, list[Panel]]]:
    """The dashboard's rows and their panels, top to bottom."""
    overview = [
        Panel(
            "stat",
            "Replicas up",
            [Target(f"sum(up{{{SEL}}})")],
            width=4,
            height=4,
            description="Replicas Prometheus can scrape.",
            thresholds=[(None, "red"), (1, "orange"), (2, "green")],
        ),
        Panel(
            "stat",
            "Requests / s",
            [Target(f"sum(rate(vlltr_request_duration_seconds_count{{{SEL}, {API_ROUTES}}}[$__rate_interval]))")],
            unit="reqps",
            width=4,
            height=4,
            decimals=1,
        ),
        Panel(
            "stat",
            "5xx share",
            [
                Target(
                    f"sum(rate(vlltr_request_duration_seconds_count"
                    f'{{{SEL}, {API_ROUTES}, status=~"5.."}}[$__rate_interval]))'
                    f" / sum(rate(vlltr_request_duration_seconds_count{{{SEL}, {API_ROUTES}}}[$__rate_interval]))"
                )
            ],
            unit="percentunit",
            width=4,
            height=4,
            thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
        ),
        Panel(
            "stat",
            "p99 classify latency",
            [Target(_quantile(0.99, "vlltr_request_duration_seconds", extra='route=~"/v1/classify.*"'))],
            unit="s",
            width=4,
            height=4,
            thresholds=[(None, "green"), (0.5, "orange"), (1, "red")],
        ),
        Panel(
            "stat",
            "Class table version",
            [Target(f"max(vlltr_class_table_version{{{SEL}}})")],
            width=4,
            height=4,
            description="Bumped by every class change; all replicas should agree.",
        ),
        Panel(
            "stat",
            "Redis up (min over replicas)",
            [Target(f"min(vlltr_redis_up{{{SEL}}})")],
            width=4,
            height=4,
            thresholds=[(None, "red"), (1, "green")],
        ),
    ]
    traffic = [
        Panel(
            "timeseries",
            "Requests / s by route and status",
            [
                Target(
                    f"sum by (route, status) (rate(vlltr_request_duration_seconds_count{{{SEL}}}[$__rate_interval]))",
                    "{{route}} {{status}}",
                )
            ],
            unit="reqps",
            stack=True,
        ),
        Panel(
            "timeseries",
            "Requests / s by replica",
            [
                Target(
                    f"sum by (instance) (rate(vlltr_request_duration_seconds_count"
                    f"{{{SEL}, {API_ROUTES}}}[$__rate_interval]))",
                    "{{instance}}",
                )
            ],
            unit="reqps",
            description="The balancer should spread load roughly evenly.",
        ),
        Panel(
            "timeseries",
            "Classify latency",
            [
                Target(
                    _quantile(0.5, "vlltr_request_duration_seconds", "route", 'route=~"/v1/classify.*"'),
                    "p50 {{route}}",
                ),
                Target(
                    _quantile(0.95, "vlltr_request_duration_seconds", "route", 'route=~"/v1/classify.*"'),
                    "p95 {{route}}",
                ),
                Target(
                    _quantile(0.99, "vlltr_request_duration_seconds", "route", 'route=~"/v1/classify.*"'),
                    "p99 {{route}}",
                ),
            ],
            unit="s",
        ),
        Panel(
            "timeseries",
            "5xx share by route",
            [
                Target(
                    f"sum by (route) (rate(vlltr_request_duration_seconds_count"
                    f'{{{SEL}, status=~"5.."}}[$__rate_interval]))'
                    f" / sum by (route) (rate(vlltr_request_duration_seconds_count{{{SEL}}}[$__rate_interval]))",
                    "{{route}}",
                )
            ],
            unit="percentunit",
        ),
    ]
    connections = [
        Panel(
            "timeseries",
            "Open connections vs limit",
            [
                Target(f"vlltr_http_connections{{{SEL}}}", "open {{instance}}"),
                Target(f"vlltr_http_connections_limit{{{SEL}}}", "limit {{instance}}"),
            ],
            width=8,
            description="Client connections per server process (VLLTR_MAX_CONNECTIONS); past the limit new "
            "ones are answered 503 and closed.",
        ),
        Panel(
            "timeseries",
            "Requests in progress",
            [Target(f"vlltr_http_requests_in_progress{{{SEL}}}", "{{instance}}")],
            width=8,
            description="Requests inside the app, their body being read or their answer being made; many more "
            "than the request rate suggests means slow or stalled uploads.",
        ),
        Panel(
            "timeseries",
            "Refused connections and read timeouts",
            [
                Target(
                    f"sum(rate(vlltr_http_connections_refused_total{{{SEL}}}[$__rate_interval]))", "refused connections"
                ),
                Target(
                    f"sum by (stage) (rate(vlltr_http_read_timeouts_total{{{SEL}}}[$__rate_interval]))",
                    "{{stage}} read timeouts",
                ),
            ],
            unit="ops",
            width=8,
            description="Connections refused at the limit; requests whose head or body stalled past "
            "VLLTR_HEADER_READ_TIMEOUT_S / VLLTR_BODY_READ_TIMEOUT_S (answered 408 and closed).",
        ),
    ]
    batching = [
        Panel(
            "timeseries",
            "Queue depth vs capacity",
            [
                Target(f"vlltr_queue_depth{{{SEL}}}", "depth {{instance}}"),
                Target(f"vlltr_queue_capacity{{{SEL}}}", "capacity {{instance}}"),
            ],
            description="Requests waiting for a micro-batch; at capacity new requests get 503.",
        ),
        Panel(
            "timeseries",
            "Queue wait",
            [
                Target(_quantile(0.5, "vlltr_queue_wait_seconds"), "p50"),
                Target(_quantile(0.95, "vlltr_queue_wait_seconds"), "p95"),
                Target(_quantile(0.99, "vlltr_queue_wait_seconds"), "p99"),
            ],
            unit="s",
            description="Time from enqueue to batch start; bounded by VLLTR_MAX_WAIT_MS when idle.",
        ),
        Panel(
            "timeseries",
            "Batch size",
            [
                Target(
                    f"sum(rate(vlltr_batch_size_sum{{{SEL}}}[$__rate_interval])) / "
                    f"sum(rate(vlltr_batch_size_count{{{SEL}}}[$__rate_interval]))",
                    "mean",
                ),
                Target(_quantile(0.95, "vlltr_batch_size"), "p95"),
                Target(f"sum(rate(vlltr_batch_size_count{{{SEL}}}[$__rate_interval]))", "batches / s"),
            ],
        ),
        Panel(
            "timeseries",
            "Preprocess and inference time (p95)",
            [
                Target(_quantile(0.95, "vlltr_preprocess_duration_seconds"), "preprocess"),
                Target(_quantile(0.95, "vlltr_inference_duration_seconds"), "inference"),
            ],
            unit="s",
        ),
    ]
    cache_and_classes = [
        Panel(
            "timeseries",
            "Cache hit ratio",
            [
                Target(
                    f'sum(rate(vlltr_cache_lookups_total{{{SEL}, result="hit"}}[$__rate_interval]))'
                    f" / sum(rate(vlltr_cache_lookups_total{{{SEL}}}[$__rate_interval]))",
                    "hit ratio",
                )
            ],
            unit="percentunit",
            width=8,
        ),
        Panel(
            "timeseries",
            "Cache lookups by result",
            [Target(f"sum by (result) (rate(vlltr_cache_lookups_total{{{SEL}}}[$__rate_interval]))", "{{result}}")],
            unit="ops",
            width=8,
            stack=True,
            description="'error' means the cache (Redis) failed and the request was served uncached.",
        ),
        Panel(
            "timeseries",
            "Rejected requests",
            [Target(f"sum by (reason) (rate(vlltr_requests_rejected_total{{{SEL}}}[$__rate_interval]))", "{{reason}}")],
            unit="reqps",
            width=8,
        ),
        Panel(
            "timeseries",
            "Predictions by class tier",
            [Target(f"sum by (tier) (rate(vlltr_predictions_total{{{SEL}}}[$__rate_interval]))", "{{tier}}")],
            unit="ops",
            width=8,
            stack=True,
            description="Top-1 predictions split by the training frequency of the predicted class.",
        ),
        Panel(
            "timeseries",
            "Classes by source",
            [Target(f"max by (source) (vlltr_classes{{{SEL}}})", "{{source}}")],
            width=8,
            stack=True,
        ),
        Panel(
            "timeseries",
            "Redis reachable",
            [Target(f"vlltr_redis_up{{{SEL}}}", "{{instance}}")],
            width=8,
            description="1 when the replica reaches Redis; 0 means uncached serving.",
        ),
    ]
    model = [
        Panel(
            "table",
            "Loaded model per replica",
            [Target(f"vlltr_model_info{{{SEL}}}", instant=True, table=True)],
            width=24,
            height=6,
            description="Bundle id, execution provider actually in use, and precision.",
        ),
    ]
    return [
        ("Overview", overview),
        ("Traffic", traffic),
        ("Connections and slow clients", connections),
        ("Batching and inference", batching),
        ("Cache and classes", cache_and_classes),
        ("Model", model),
    ]


def build() -> dict[str, Any]:
    """Return the dashboard as a JSON-ready dict."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for title, row_panels in sections():
        panels.append(_row_json(title, next_id, y))
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x = 0
                y += row_height
                row_height = 0
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    variable_source = "vlltr_model_info"
    return {
        "uid": DASHBOARD_UID,
        "title": "vlltr service",
        "description": "Traffic, latency, micro-batching, cache and class table of the vlltr API replicas.",
        "tags": ["vlltr"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": f"label_values({variable_source}, job)", "refId": "job"},
                    "definition": f"label_values({variable_source}, job)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "refresh": 2,
                    "sort": 1,
                },
                {
                    "name": "instance",
                    "label": "Replica",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": f'label_values({variable_source}{{job=~"$job"}}, instance)',
                        "refId": "instance",
                    },
                    "definition": f'label_values({variable_source}{{job=~"$job"}}, instance)',
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "refresh": 2,
                    "sort": 1,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    """The dashboard file's exact text (stable key order, trailing newline)."""
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboard JSON, or with --check report whether the file is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the generated JSON")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python deploy/tools/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
