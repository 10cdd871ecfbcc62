"""`bench/gpu_check.py --smoke`: the GPU check's code paths at tiny size on the CPU.

The full check runs only where a GPU is lent, so this is what keeps it from rotting: every
check but the Ray one (tests/integration/test_gpu_check_weight_pool.py runs that) must pass,
with the figures the report promises; what the run imports must exist on the lent GPU image
or in `make gpu-wheels`; and `--budget-s` must stop the run cleanly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
FAMILY_CHECKS = ("checkpoint", "load", "parity.float32", "speed.float32", "engine", "alone",
                 "offload_budget", "parity.bfloat16", "speed.bfloat16")
SD_CHECKS = (*FAMILY_CHECKS[:6], "step_scheduling", *FAMILY_CHECKS[6:])
EXPECTED = ["environment", "oom_retry", *(f"sd.{c}" for c in SD_CHECKS),
            *(f"flux2-klein.{c}" for c in FAMILY_CHECKS)]
# The Python packages of the CUDA image this project's GPU checks may be lent (an H200 with
# Python 3.12 and torch, no internet), as the device documentation listed them on 2026-11-17.
_GPU_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
"""
GPU_IMAGE_PACKAGES = frozenset(_GPU_IMAGE_LIST.split())
# Required by a wheel's metadata but never imported on Python 3.12 (`pip install --no-deps`).
NOT_IMPORTED_THERE = {"importlib-metadata"}  # diffusers imports it below Python 3.8 only


def _name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _gpu_wheels() -> set[str]:
    """`GPU_WHEEL_PACKAGES` of the Makefile (`make gpu-wheels`)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^GPU_WHEEL_PACKAGES = (.+)$", text, re.MULTILINE)
    assert match, "the Makefile has no GPU_WHEEL_PACKAGES"
    return {_name(name) for name in match.group(1).split()}


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out),
         "--scratch", str(tmp_path / "scratch"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    report["markdown"] = (out / "gpu_check.md").read_text()
    return done, report


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    start = time.monotonic()
    # A generous budget: the point here is that every path works, not the machine's speed.
    done, report = _run(tmp_path_factory.mktemp("smoke"), "--skip", "weight_pool",
                        "--budget-s", "600")
    print(f"smoke run: {time.monotonic() - start:.1f}s")  # shown with -s; it must fit 60 s
    return done, report


def test_smoke_runs_every_check_and_reports_the_figures(smoke) -> None:
    done, report = smoke
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == EXPECTED
    assert {c["status"] for c in checks.values()} == {"passed"}, done.stdout[-4000:]
    for family in ("sd", "flux2-klein"):
        parity = checks[f"{family}.parity.float32"]["data"]
        assert parity["max_abs_diff"] <= 1e-4
        assert {row["component"] for row in parity["memory"]} >= {"vae", "text_encoder"}
        assert all(row["forwards"] > 0 for row in parity["memory"])
        engine = checks[f"{family}.engine"]["data"]
        assert [row["batch"] for row in engine["throughput"]] == [1, 4]
        assert engine["throughput"][-1]["mean_images_per_call"] == 4  # the engine batched
        assert all(row["max_abs_8bit"] == 0 for row in engine["batched_vs_alone"])
        assert checks[f"{family}.alone"]["data"]["calls"] == [1, 1, 1, 1]
        assert checks[f"{family}.offload_budget"]["data"]["evictions"] > 0
        assert checks[f"{family}.speed.bfloat16"]["data"]["ms_per_image"]["diffusers"] > 0
    scheduling = checks["sd.step_scheduling"]["data"]
    assert scheduling["classes"] == [1, 4]  # a fifth of the smoke model's 4 steps, and all
    assert {mode: sorted(by_class) for mode, by_class in scheduling["unloaded_s"].items()} == \
        {"step": ["1", "4"], "request": ["1", "4"]}  # JSON keys
    (row,) = scheduling["rates"]
    assert row["requests"] > 0 and row["step"]["errors"] == row["request"]["errors"] == 0
    assert row["step"]["mean_requests_sharing_a_step"] >= 1
    assert len(scheduling["goals"]) == 2 and scheduling["goals"][0].startswith("goal 1: ")
    retry = checks["oom_retry"]["data"]
    assert [m["reason"] for m in retry["moves_after_pressure"]] == ["evict-oom", "load-retry"]
    assert "| sd.engine | passed |" in report["markdown"]


def test_what_the_run_imports_is_on_the_gpu_image_or_in_the_wheels(smoke) -> None:
    """A bare CUDA image gets only `make gpu-wheels`: a new import of the service (a package
    blockserve requires) or a new requirement of a wheel must be added there, or the GPU run
    would fail at its first import."""
    _, report = smoke
    available = GPU_IMAGE_PACKAGES | _gpu_wheels()
    ours = {_name(Requirement(r).name) for r in metadata.requires("blockserve") or ()
            if "extra ==" not in r or 'extra == "serve"' in r}
    used = {_name(d) for d in report["imported_distributions"]} & ours
    assert used >= {"torch", "diffusers", "transformers", "fastapi", "pydantic"}
    assert not used - available, "add these to the Makefile's GPU_WHEEL_PACKAGES"
    environment = {"python_version": "3.12", "extra": ""}
    for wheel in _gpu_wheels():
        needs = {_name(Requirement(r).name) for r in metadata.requires(wheel) or ()
                 if Requirement(r).marker is None or Requirement(r).marker.evaluate(environment)}
        missing = needs - available - NOT_IMPORTED_THERE
        assert not missing, f"{wheel} needs {missing}: add them to GPU_WHEEL_PACKAGES"


def test_a_short_budget_stops_cleanly_with_a_report(tmp_path: Path) -> None:
    done, report = _run(tmp_path, "--budget-s", "0.5", "--only", "environment", "oom_retry",
                        "sd.checkpoint", "sd.load")
    assert done.returncode == 2, done.stdout + done.stderr
    statuses = {check["name"]: check for check in report["checks"]}
    assert statuses["environment"]["status"] == "passed"
    assert statuses["sd.checkpoint"]["status"] == "skipped"
    assert statuses["sd.checkpoint"]["summary"].startswith("budget:")
    assert statuses["sd.load"]["summary"] == "needs sd.checkpoint, which did not pass"
    assert report["state"] == "finished" and report["exit_code"] == 2
