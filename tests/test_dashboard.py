"""The Grafana dashboard (helm/dashboards/toolserver-manager.json) only queries metrics the
manager really exports, in the form Prometheus exposes them, by labels they really carry.

There is no Grafana server here: the dashboard is checked as JSON and its PromQL as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.metrics import MetricWrapperBase

import shared.metrics as metrics
from testing.metrics import family_of

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "dashboards" / "toolserver-manager.json"
CHART_COPY = ROOT / "helm" / "toolserver-manager" / "dashboards" / "toolserver-manager.json"
NAME_RE = re.compile(r"\btoolserver_[a-zA-Z0-9_]+")
# labels every series has once scraped (target labels; manager_id comes from the ServiceMonitor)
TARGET_LABELS = {"job", "instance", "namespace", "pod", "manager_id"}


def exported_families() -> dict[str, str]:
    """Family name -> type, from the registry the manager exports (counters lose _total there)."""
    return {f.name: f.type for f in prometheus_client.REGISTRY.collect() if f.name.startswith("toolserver_")}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def families() -> dict[str, str]:
    fams = exported_families()
    assert len(fams) >= 16, f"manager.metrics registered only {sorted(fams)}"
    return fams


@pytest.fixture(scope="module")
def labels_by_family() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            out[obj._name] = set(obj._labelnames)
    return out


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows keep theirs inside


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def template_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            out.append(q)
    return out


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "toolserver-manager" and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["refId"] and t["datasource"]["uid"] == "${datasource}", p["title"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "manager_id"} <= names
    # the chart ships this very file
    assert json.loads(CHART_COPY.read_text()) == dashboard


def test_every_metric_in_the_dashboard_is_exported(dashboard: dict[str, Any], families: dict[str, str]) -> None:
    queries = [e for _, e in exprs(dashboard)] + template_queries(dashboard)
    used: set[str] = set()
    unknown: list[str] = []
    for q in queries:
        for name in NAME_RE.findall(q):
            fam = family_of(name, families)
            if fam is None:
                unknown.append(f"{name} in {q!r}")
            else:
                used.add(fam)
    assert not unknown, f"series the manager does not expose (family/type/suffix mismatch): {unknown}"
    # the dashboard covers every family
    assert used == set(families), f"families with no panel: {sorted(set(families) - used)}"


def test_labels_used_exist_on_the_metrics(dashboard: dict[str, Any], families: dict[str, str],
                                          labels_by_family: dict[str, set[str]]) -> None:
    problems: list[str] = []
    for title, expr in exprs(dashboard):
        fams = {family_of(n, families) for n in NAME_RE.findall(expr)} - {None}
        known = set(TARGET_LABELS)
        for f in fams:
            known |= labels_by_family.get(f, set())
            if families[f] == "histogram" and "_bucket" in expr:
                known.add("le")
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                if label not in known:
                    problems.append(f"{title}: by ({label}) in {expr}")
        for label in re.findall(r"[{,]\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", expr):
            if label not in known:
                problems.append(f"{title}: matcher on {label} in {expr}")
    assert not problems, problems


def _find(dashboard: dict[str, Any], pattern: str) -> list[str]:
    return [f"{t}: {e}" for t, e in exprs(dashboard) if re.search(pattern, e)]


def test_required_panels(dashboard: dict[str, Any]) -> None:
    # creation latency percentiles
    q = _find(dashboard, r"histogram_quantile\(0\.\d+, sum by \([^)]*\ble\b[^)]*\) \(rate\("
                         r"toolserver_node_create_duration_seconds_bucket")
    assert len(q) >= 3, q
    # proxy rate and latency
    assert _find(dashboard, r"rate\(toolserver_proxy_requests_total")
    assert _find(dashboard, r"histogram_quantile\(.*toolserver_proxy_request_duration_seconds_bucket")
    # nodes by status, leader, checker cycle
    assert _find(dashboard, r"sum by \(status\) \(toolserver_nodes\b")
    assert _find(dashboard, r"toolserver_checker_leader\b")
    assert _find(dashboard, r"histogram_quantile\(.*toolserver_checker_cycle_duration_seconds_bucket")
    # histogram_quantile always aggregates by le, over a rate of buckets
    for title, expr in exprs(dashboard):
        for m in re.finditer(r"histogram_quantile\(([^,]+),\s*sum by \(([^)]*)\) \(rate\((\w+)", expr):
            assert "le" in [x.strip() for x in m.group(2).split(",")], f"{title}: {expr}"
            assert m.group(3).endswith("_bucket"), f"{title}: {expr}"


def test_queries_are_balanced(dashboard: dict[str, Any]) -> None:
    for title, expr in exprs(dashboard):
        for a, b in ("()", "{}", "[]"):
            assert expr.count(a) == expr.count(b), f"{title}: unbalanced {a}{b} in {expr}"
        assert expr.count('"') % 2 == 0, f"{title}: {expr}"
