"""Reading k8s/ for the tests: the kustomization's resources as parsed documents, the
dashboard's and the alerts' PromQL, and the metric names an expression uses.

It reads files only; it does not run kustomize (not installed here), so it resolves just what
k8s/ uses: `resources`, `components` and one `configMapGenerator` of files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# What every developer and CI has at ../shared (a worktree elsewhere can name it); a clone
# with nothing beside it has none, and a test that reads it (`kuberay_crd()`) skips, saying why.
SHARED = Path(os.environ.get("BLOCKSERVE_SHARED_DIR") or ROOT.parent / "shared")
KUBERAY_CRD = SHARED / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
DASHBOARD = K8S / "dashboards" / "blockserve.json"
RAY_SERVE_METRICS = K8S / "ray_serve_metrics.txt"
KUBERNETES_METRICS = K8S / "kubernetes_metrics.txt"


def kuberay_crd() -> dict[str, Any]:
    """KubeRay's RayService CRD from ../shared; the calling test is skipped, with the reason,
    when this clone has no ../shared beside it."""
    if not KUBERAY_CRD.exists():
        pytest.skip(f"KubeRay's CRD schema {KUBERAY_CRD} is missing: no ../shared beside this "
                    "clone (set BLOCKSERVE_SHARED_DIR to check against it)")
    return yaml.safe_load(KUBERAY_CRD.read_text())


def load_kustomization(folder: Path = K8S) -> list[dict[str, Any]]:
    """Every document the kustomization in `folder` (and its components) declares, with the
    generated ConfigMaps built as kustomize would (names without the hash suffix)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        documents += [doc for doc in yaml.safe_load_all((folder / entry).read_text()) if doc]
    for component in kustomization.get("components", []):
        documents += load_kustomization(folder / component)
    for generator in kustomization.get("configMapGenerator", []):
        options = generator.get("options", {})
        documents.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "labels": options.get("labels", {})},
            "data": {Path(name).name: (folder / name).read_text()
                     for name in generator.get("files", [])},
        })
    namespace = kustomization.get("namespace")
    for doc in documents:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"].setdefault("namespace", namespace)
    return documents


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def rule_expressions(documents: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(alert or record name, expression) for every rule of every PrometheusRule."""
    return [(rule.get("alert") or rule.get("record"), rule["expr"])
            for doc in documents if doc["kind"] == "PrometheusRule"
            for group in doc["spec"]["groups"] for rule in group["rules"]]


def concrete(expression: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """A dashboard expression with Grafana's variables replaced, so Prometheus can run it."""
    return (expression.replace("$__rate_interval", rate_interval)
            .replace("${model}", model).replace("$model", model))


_FUNCTIONS_AND_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "absent", "absent_over_time", "abs", "ceil", "floor", "round",
    "clamp_min", "clamp_max", "clamp", "label_replace", "label_join", "vector", "scalar", "time",
    "sum_over_time", "avg_over_time", "max_over_time", "min_over_time", "count_over_time",
    "deriv", "predict_linear", "changes", "resets", "sort", "sort_desc", "timestamp", "inf", "nan",
}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (a tokenizer, not a parser: it drops
    strings, label matchers, grouping label lists, durations, numbers and function names)."""
    text = concrete(expression)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)              # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)                        # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)                       # range selectors
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
    return {word for word in words if word.lower() not in _FUNCTIONS_AND_KEYWORDS}


def listed_names(path: Path) -> set[str]:
    """Metric names in one of k8s/'s lists: one per line, `#` comments."""
    return {line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip()}


def exported_names(exposition: str) -> set[str]:
    """Every sample name a Prometheus text exposition declares or carries, histograms'
    _bucket/_sum/_count and counters' _total included."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def with_histogram_series(names: set[str]) -> set[str]:
    return names | {f"{name}{suffix}" for name in names for suffix in ("_bucket", "_sum", "_count")}
