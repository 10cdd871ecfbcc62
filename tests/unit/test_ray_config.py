"""Ray mode's configuration and readiness without a cluster: the Serve application's typed
arguments (what the YAML files pass, unknown keys rejected with the valid ones named) and the
readiness probe of `RayPlacement` against fake deployment handles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.app_config import ServeAppConfig, WeightPoolConfig

ROOT = Path(__file__).resolve().parents[2]


def application_args(path: Path) -> dict:
    documents = list(yaml.safe_load_all(path.read_text()))
    config = next(d for d in documents if d)
    if "spec" in config:  # the RayService: serveConfigV2 is a YAML string
        config = yaml.safe_load(config["spec"]["serveConfigV2"])
    return config["applications"][0]["args"]


@pytest.mark.parametrize("path", ["deployments/serve_config.yaml", "k8s/rayservice.yaml"])
def test_the_shipped_yaml_args_are_valid_and_leave_shared_settings_to_the_environment(path):
    config = ServeAppConfig.parse(application_args(ROOT / path))
    assert config.concurrency == 16
    assert config.weight_pool == WeightPoolConfig(idle_offload_s=600, heartbeat_s=2)
    overrides = config.settings_overrides()
    assert {k: v for k, v in overrides.items() if v is not None} == {}


def test_unknown_keys_are_rejected_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"max_batch: unknown key; valid: models_file, "
                                         r"concurrency, max_batch_size"):
        ServeAppConfig.parse({"max_batch": 4})
    with pytest.raises(ValueError, match=r"weight_pool.idle: unknown key; valid: enabled, "
                                         r"idle_offload_s"):
        ServeAppConfig.parse({"weight_pool": {"idle": 1}})
    with pytest.raises(ValueError, match="concurrency: Input should be greater than or equal"):
        ServeAppConfig.parse({"concurrency": 0})
    with pytest.raises(ValueError, match="scheduling: Input should be 'step' or 'request'"):
        ServeAppConfig.parse({"scheduling": "tick"})


def test_args_that_name_service_settings_override_them():
    from service.settings import Settings

    config = ServeAppConfig.parse({"max_batch_size": 4, "scheduling": "request"})
    settings = Settings.from_env({}, **config.settings_overrides())
    assert (settings.max_batch_size, settings.scheduling) == (4, "request")
    assert Settings.from_env({}, **ServeAppConfig.parse({}).settings_overrides()) == \
        Settings.from_env({})


class _Response:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def result(self, timeout_s=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, outcome):
        self.responses: list[_Response] = []
        self.outcome = outcome

        class Ping:
            def remote(inner):
                self.responses.append(_Response(self.outcome))
                return self.responses[-1]

        self.ping = Ping()


def test_ray_mode_is_ready_only_when_every_deployment_answers():
    from service.ray_placement import RayPlacement

    starting = _Handle(TimeoutError())  # no replica has finished starting
    handles = {"TextEncoder": _Handle(None), "Denoiser": starting, "VAE": _Handle(None)}
    placement = RayPlacement(handles)
    ready, detail = placement.ready()
    assert not ready
    assert detail["deployments"]["Denoiser"] == "no running replica answered yet"
    assert detail["deployments"]["VAE"] == "ready"
    assert starting.responses[-1].cancelled  # the probe does not stay queued
    starting.outcome = None
    assert placement.ready() == (True, {"deployments": dict.fromkeys(handles, "ready")})
    # Asked again within the cache time: the same answer, without probing.
    probes = len(starting.responses)
    assert placement.ready() == (True, {"deployments": dict.fromkeys(handles, "ready")})
    assert len(starting.responses) == probes
