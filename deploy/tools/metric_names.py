"""Which metric names the dashboard and the alert rules use, and which ones a service exposes.

Used by the deployment tests to prove that every ``vlltr_*`` series a panel or an alert queries
exists in the service's ``/metrics`` output, so a renamed metric cannot silently blank a panel or
disarm an alert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "vlltr_"
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![A-Za-z0-9_:])(" + PREFIX + r"[A-Za-z0-9_:]*)")
# Series a family of each type produces, by suffix (the text format's sample names).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
}


def names_in_promql(expr: str) -> set[str]:
    """The ``vlltr_*`` metric names a PromQL expression refers to.

    Quoted strings (label values, regexes) are removed first so a label value that happens to start
    with the prefix is not mistaken for a metric.
    """
    return set(_IDENT.findall(_QUOTED.sub('""', expr)))


def _walk_dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, (str, dict)):
                if isinstance(value, str):
                    yield value
                else:
                    yield from _walk_dashboard_exprs(value)
            else:
                yield from _walk_dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_dashboard_exprs(item)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a Grafana dashboard (panel targets and variable queries)."""
    return list(_walk_dashboard_exprs(dashboard))


def rules_exprs(rules: dict[str, Any]) -> list[str]:
    """Every ``expr`` of a Prometheus rules file (alerting and recording rules)."""
    exprs = []
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            exprs.append(str(rule["expr"]))
    return exprs


def used_names(dashboard_files: Iterable[Path], rule_files: Iterable[Path]) -> dict[str, set[str]]:
    """Map each ``vlltr_*`` name used by the given dashboards and rule files to the files using it."""
    used: dict[str, set[str]] = {}
    for path in dashboard_files:
        for expr in dashboard_exprs(json.loads(path.read_text(encoding="utf-8"))):
            for name in names_in_promql(expr):
                used.setdefault(name, set()).add(path.name)
    for path in rule_files:
        for expr in rules_exprs(yaml.safe_load(path.read_text(encoding="utf-8"))):
            for name in names_in_promql(expr):
                used.setdefault(name, set()).add(path.name)
    return used


def exposed_names(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition provides.

    Besides the samples present, each family contributes the names its type produces once
    observed, so a labelled histogram that has not seen a request yet still counts as exposing
    its ``_bucket``/``_count``/``_sum`` series.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
