"""k8s/ against the real schemas: built-in kinds with kubernetes-validate (its offline
OpenAPI schemas, strict), the RayService with jsonschema against KubeRay's CRD from
../shared/schemas/kuberay/, the Prometheus Operator kinds structurally, and serveConfigV2
against deployments/serve_config.yaml (they must not drift apart)."""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.k8s_manifests import (
    DASHBOARD,
    K8S,
    ROOT,
    kuberay_crd,
    load_kustomization,
    one,
)

KUBERNETES_VERSION = "1.32.0"  # one kubernetes-validate ships schemas for; KubeRay supports it
BUILT_IN_GROUPS = ("v1", "apps/v1", "networking.k8s.io/v1", "batch/v1", "policy/v1")
# The one difference allowed between the two serve configs: GPU shares per deployment, which
# deployments/serve_config.yaml keeps at 0 so it runs on a CPU-only machine.
K8S_GPU_SHARES = {"Router": 0, "TextEncoder": 0.25, "Denoiser": 1, "VAE": 0.25}

DOCUMENTS = load_kustomization()
RAYSERVICE = one(DOCUMENTS, "RayService")


def _built_in(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["apiVersion"] in BUILT_IN_GROUPS]


def _pod_templates() -> dict[str, dict[str, Any]]:
    cluster = RAYSERVICE["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def test_the_kustomization_has_every_kind_the_deployment_needs():
    kinds = {doc["kind"] for doc in DOCUMENTS}
    assert {"Namespace", "RayService", "Service", "PodMonitor", "ServiceMonitor",
            "PrometheusRule", "ConfigMap"} <= kinds
    assert "Ingress" not in kinds, "the Ingress is optional: a component, not a default resource"
    with_ingress = load_kustomization(K8S / "components" / "ingress")
    assert [doc["kind"] for doc in with_ingress] == ["Ingress"]


@pytest.mark.parametrize("document", _built_in(DOCUMENTS + load_kustomization(
    K8S / "components" / "ingress")), ids=lambda doc: f"{doc['kind']}-{doc['metadata']['name']}")
def test_built_in_kinds_are_valid_kubernetes(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("group", list(_pod_templates()))
def test_ray_pod_templates_are_valid_pod_specs(group):
    # KubeRay's CRD keeps pod templates loose in places; the Pod schema checks every field.
    template = _pod_templates()[group]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"blockserve-{group}"},
           "spec": template["spec"]}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def _kuberay_schema() -> dict[str, Any]:
    crd = kuberay_crd()  # skips the test when there is no ../shared
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever it lists properties and does not
    preserve unknown fields, as the API server's pruning would drop them: a typo fails."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


@functools.cache
def _crd_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_closed(_kuberay_schema()))


def test_rayservice_validates_against_kuberays_crd():
    validator = _crd_validator()
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(RAYSERVICE)]
    assert not errors, "\n".join(errors)


def test_the_crd_check_catches_a_typo():
    broken = copy.deepcopy(RAYSERVICE)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not _crd_validator().is_valid(broken)


def test_workers_ask_for_gpus_and_gate_readiness_on_readyz():
    for group, template in _pod_templates().items():
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()
            if group == "head":
                continue
            assert resources["limits"]["nvidia.com/gpu"] == "1"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        if group != "head":
            assert any(t["key"] == "nvidia.com/gpu" for t in template["spec"]["tolerations"])


def _applications(config: dict[str, Any]) -> dict[str, Any]:
    return {app["name"]: app for app in config["applications"]}


def test_serve_config_v2_matches_deployments_serve_config():
    local = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    cluster = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    expected = _applications(copy.deepcopy(local))
    for deployment in expected["blockserve"]["deployments"]:
        deployment["ray_actor_options"]["num_gpus"] = K8S_GPU_SHARES[deployment["name"]]
    assert _applications(cluster) == expected, (
        "k8s/rayservice.yaml's serveConfigV2 and deployments/serve_config.yaml drifted apart: "
        "change both (only num_gpus may differ, see K8S_GPU_SHARES)")
    assert cluster["http_options"]["host"] == "0.0.0.0"  # pods are reached from outside


def test_the_drift_check_catches_a_change():
    cluster = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    cluster["applications"][0]["args"]["concurrency"] += 1
    assert _applications(cluster) != _applications(local)


def test_the_service_and_monitors_select_the_ray_pods():
    service = one(DOCUMENTS, "Service", "blockserve")
    pod_labels = [t["metadata"]["labels"] for t in _pod_templates().values()]
    selector = {k: v for k, v in service["spec"]["selector"].items() if k != "ray.io/serve"}
    assert all(selector.items() <= labels.items() for labels in pod_labels)
    serve_ports = [{p["name"] for p in t["spec"]["containers"][0]["ports"]}
                   for t in _pod_templates().values()]
    assert all({"serve", "metrics"} <= ports for ports in serve_ports)

    pod_monitor = one(DOCUMENTS, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    match = pod_monitor["spec"]["selector"]["matchLabels"]
    assert all(match.items() <= labels.items() for labels in pod_labels)
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]

    service_monitor = one(DOCUMENTS, "ServiceMonitor")
    assert service_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (service_monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items())
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in service_monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_prometheus_rule_is_well_formed_and_has_the_promised_alerts():
    rule = one(DOCUMENTS, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert set(item) <= {"alert", "expr", "for", "labels", "annotations"}, item
            assert item["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= item["annotations"].keys()
            alerts[item["alert"]] = item["expr"]
    expected = {"BlockserveHighErrorRatio": "blockserve_requests_total",
                "BlockserveHighLatencyP95": "blockserve_request_duration_seconds_bucket",
                "BlockserveQueueSaturated": "blockserve_queue_depth",
                "BlockserveNoReadyReplicas": "ray_serve_deployment_replica_healthy",
                "BlockserveMemoryNearLimit": "container_memory_working_set_bytes"}
    for name, metric in expected.items():
        assert metric in alerts[name], name


def test_the_dashboard_configmap_is_generated_from_the_json():
    config_map = one(DOCUMENTS, "ConfigMap", "blockserve-grafana-dashboard")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    dashboard = json.loads(config_map["data"]["blockserve.json"])
    assert dashboard["uid"] == "blockserve"
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("requests/s", "errors", "p50/p95/p99", "queue depth", "queue wait",
                  "per-block", "batch size", "replicas per deployment", "loads and offloads",
                  "resident", "images/s"):
        assert topic in titles, topic
    assert DASHBOARD.read_text() == config_map["data"]["blockserve.json"]


def test_the_dockerfile_uses_the_clusters_ray_and_the_makefiles_torch():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    ray_version = RAYSERVICE["spec"]["rayClusterConfig"]["rayVersion"]
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py\d+-gpu$", dockerfile, re.M)
    (torch_pin,) = set(re.findall(r"torch==([\d.]+)", makefile))
    assert f"TORCH_VERSION={torch_pin}" in dockerfile


def test_the_image_holds_the_checkpoints_the_default_models_file_names():
    # The image serves service/models.yaml from /app/service, laid out as the repo is, so a
    # committed checkpoint it names by a relative path (assets/tiny-shapes-sd) must be copied
    # in, and not dropped by .dockerignore.
    from service.models_file import load_models_file
    from service.settings import DEFAULT_MODELS_FILE

    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    committed = [config for config in load_models_file(DEFAULT_MODELS_FILE).models.values()
                 if config.create_tiny is None and config.path
                 and config.path.startswith(str(ROOT))]
    assert committed, "the default models file names no committed checkpoint"
    for config in committed:
        top = config.path.removeprefix(str(ROOT)).strip("/").split("/")[0]
        assert re.search(rf"^COPY .*\s{top}/ {top}/$", dockerfile, re.M), config.name
        assert top not in ignored, config.name
