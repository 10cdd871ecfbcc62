"""The PromQL in k8s/ checked by the real tools: the PrometheusRule's groups and every
dashboard query (as recording rules) through `promtool check rules`, and every metric name
they use against what the service exports (a live in-process /metrics after generations) or a
documented list (k8s/ray_serve_metrics.txt, k8s/kubernetes_metrics.txt)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.models_file import parse_models
from service.settings import Settings
from tests.unit.k8s_manifests import (
    KUBERNETES_METRICS,
    RAY_SERVE_METRICS,
    concrete,
    dashboard_queries,
    exported_names,
    listed_names,
    load_kustomization,
    metric_names,
    one,
    rule_expressions,
    with_histogram_series,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus; "
    ".ci/run installs it where apt is available)")
DOCUMENTS = load_kustomization()
DEMO = {"models": {"demo": {"family": "demo", "defaults": {"steps": 2, "size": "32x32"}}}}


def _promtool_check(tmp_path: Path, groups: list[dict]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_prometheus_rules_pass_promtool(tmp_path):
    _promtool_check(tmp_path, one(DOCUMENTS, "PrometheusRule")["spec"]["groups"])


@needs_promtool
def test_dashboard_queries_pass_promtool(tmp_path):
    # promtool parses a recording rule's expr like any query: a syntax error fails here.
    records = [{"record": f"blockserve:dashboard:{index}", "expr": concrete(expr)}
               for index, (_, expr) in enumerate(dashboard_queries())]
    _promtool_check(tmp_path, [{"name": "dashboard", "rules": records}])


@needs_promtool
def test_promtool_rejects_a_broken_query(tmp_path):
    with pytest.raises(AssertionError):
        _promtool_check(tmp_path, [{"name": "x", "rules": [
            {"record": "x", "expr": "sum by (model (rate(blockserve_requests_total[1m]))"}]}])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Metric names a live app exports after a couple of generations (in-process)."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    app = create_app(Settings(models_file=tmp_path / "unused.yaml"),
                     parse_models(DEMO, tmp_path))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for seed in (1, 2):
            response = client.post("/v1/images/generations",
                                   json={"model": "demo", "prompt": "red", "seed": seed})
            assert response.status_code == 200, response.text
        return exported_names(client.get("/metrics").text)


def test_the_extractor_finds_metric_names():
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model"}'
        '[$__rate_interval]))) / on (x) group_left b_total > 0.5 or absent(c)'
    ) == {"a_bucket", "b_total", "c"}


POOL_STATS = {  # what the Ray-mode weight pool's registry reports (deployments/weight_pool.py)
    "entries": [{"entry": "ab12:float32", "keys": ["m/vae:float32"], "users": ["m/vae"],
                 "bytes": 100, "nodes": ["n1"], "resident": {"r1": {"cpu": 100}}}],
    "pool_bytes_by_node": {"n1": 100},
    "replicas": {"r1": {"node": "n1", "resident": {"ab12:float32": {"cpu": 100}},
                        "offloads": 2}},
    "hits": 3, "misses": 1, "loads": 1, "offloads": 2, "started": 0.0,
}


@pytest.fixture(scope="module")
def exported_in_ray_mode() -> set[str]:
    """The weight pool's series and the replicas' LoRA loads, as the Ray-mode router exports
    them."""
    from prometheus_client import CollectorRegistry, generate_latest

    from service.ray_placement import ReplicaLoraCollector, WeightPoolCollector

    registry = CollectorRegistry()
    registry.register(WeightPoolCollector(lambda: POOL_STATS))
    registry.register(ReplicaLoraCollector(lambda: [("load", "m", "a", 2)]))
    text = generate_latest(registry).decode()
    assert 'blockserve_pool_resident_bytes{device="cpu",entry="ab12:float32",replica="r1"} ' \
           "100.0" in text
    assert "blockserve_pool_loads_total 1.0" in text
    return exported_names(text)


def test_every_query_uses_only_known_metric_names(exported, exported_in_ray_mode):
    blockserve = {name for name in exported | exported_in_ray_mode
                  if name.startswith("blockserve_")}
    assert "blockserve_request_duration_seconds_bucket" in blockserve  # histograms expanded
    known = (blockserve | with_histogram_series(listed_names(RAY_SERVE_METRICS))
             | listed_names(KUBERNETES_METRICS))
    used = [(where, name) for where, expr in dashboard_queries() + rule_expressions(DOCUMENTS)
            for name in metric_names(expr)]
    assert used
    unknown = sorted({f"{where}: {name}" for where, name in used if name not in known})
    assert not unknown, "metrics nobody exports:\n" + "\n".join(unknown)
    assert {name for _, name in used if name.startswith("blockserve_")}, "no blockserve metric?"


def test_the_ray_serve_list_only_holds_ray_serve_names():
    names = listed_names(RAY_SERVE_METRICS)
    assert names and all(name.startswith("ray_serve_") for name in names)
