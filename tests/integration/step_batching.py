"""Step-level batching checked the same way on any server: embedded (`test_engine.py`) and Ray
(`test_ray_serve.py`). Not a test module itself.

The scenario: an *anchor* job (50 steps) starts; at its step 2 three requests arrive mid-loop
with 20, 9 and 4 steps and different guidance scales (one without guidance); at its step 10
the anchor is cancelled while the others run on. The 4-step request, submitted after the
20-step one, finishes first; every image is byte-identical to the same request made alone;
the denoiser really shared forwards (`blockserve_step_batch_size` saw more than one request).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
SPECS = {  # name: (steps, guidance, seed); submitted in this order
    "twenty": (20, 5.0, 21),
    "nine": (9, 7.5, 22),
    "four": (4, 1.0, 23),  # no guidance: half the UNet rows of the others
}


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of a server-sent event stream, as they arrive."""
    name, data = None, []
    for line in response.iter_lines():
        if not line:
            if name is not None:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = client.get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "")
    match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def shared_forwards(client: httpx.Client, model: str) -> float:
    """Denoiser forwards so far that served more than one request."""
    total = metric(client, "blockserve_step_batch_size_count", model=model)
    return total - metric(client, "blockserve_step_batch_size_bucket", model=model, le="1.0")


def body(model: str, name: str, size: str = "32x32") -> dict[str, Any]:
    steps, guidance, seed = SPECS[name]
    return {"model": model, "prompt": f"a {name} step shape", "num_inference_steps": steps,
            "guidance_scale": guidance, "seed": seed, "size": size}


def wait_until(predicate, timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def run_scenario(client: httpx.Client, model: str, anchor_prompt: str = "an anchor") -> None:
    """The scenario of the module docstring, asserted."""
    shared_before = shared_forwards(client, model)
    anchor = client.post("/v1/jobs", json={
        "model": model, "prompt": anchor_prompt, "num_inference_steps": 50, "seed": 20,
        "guidance_scale": 5.0, "size": "32x32"}).json()["id"]
    ids: dict[str, str] = {}
    finished: list[str] = []
    cancelled_at: list[int] = []
    with client.stream("GET", f"/v1/jobs/{anchor}/events") as stream:
        for name, data in events(stream):
            if name == "progress" and data["step"] >= 2 and not ids:
                for spec in SPECS:  # they arrive while the anchor is at step 2
                    response = client.post("/v1/jobs", json=body(model, spec))
                    assert response.status_code == 202, response.text
                    ids[spec] = response.json()["id"]
                watcher = threading.Thread(target=_record_finishes,
                                           args=(client, ids, finished), daemon=True)
                watcher.start()
            if name == "progress" and data["step"] >= 10 and not cancelled_at:
                cancelled = client.delete(f"/v1/jobs/{anchor}")
                assert cancelled.status_code == 200, cancelled.text
                cancelled_at.append(cancelled.json()["step"])
            if name in ("completed", "failed", "cancelled"):
                final = (name, data)
                break
    assert final[0] == "cancelled", final
    assert final[1]["step"] < 50 and final[1]["step"] <= cancelled_at[0] + 2, final
    watcher.join(120)
    statuses = {spec: client.get(f"/v1/jobs/{job_id}").json() for spec, job_id in ids.items()}
    for spec, status in statuses.items():
        assert status["status"] == "succeeded", (spec, status)
    assert finished.index("four") < finished.index("twenty"), finished
    assert shared_forwards(client, model) > shared_before  # steps were shared
    for spec, status in statuses.items():
        alone = client.post("/v1/images/generations", json=body(model, spec))
        assert alone.status_code == 200, alone.text
        assert [d["b64_json"] for d in status["result"]["data"]] == \
            [d["b64_json"] for d in alone.json()["data"]], f"{spec} differs from alone"


def _record_finishes(client: httpx.Client, ids: dict[str, str], finished: list[str]) -> None:
    deadline = time.monotonic() + 120
    while len(finished) < len(ids) and time.monotonic() < deadline:
        for spec, job_id in ids.items():
            if spec not in finished and \
                    client.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL:
                finished.append(spec)
        time.sleep(0.005)


def job_events(client: httpx.Client, job_body: dict[str, Any]) -> list[tuple[str, Any]]:
    """A job's events as a client following it from the start sees them, without timings:
    (type, detail) with the queue position, each progress's (step, total, previews) and the
    number of images; checks the progress steps rise to the total on the way. Progress made
    before the client subscribed is collapsed into its newest event by the server, so runs of
    progress are collapsed here too (the last one kept): the result is the same in any mode."""
    created = client.post("/v1/jobs", json=job_body)
    assert created.status_code == 202, created.text
    seen: list[tuple[str, Any]] = []
    steps: list[int] = []
    with client.stream("GET", f"/v1/jobs/{created.json()['id']}/events") as stream:
        for name, data in events(stream):
            if name == "queued":
                seen.append((name, data["position"]))
            elif name == "progress":
                steps.append(data["step"])
                detail = (data["step"], data["total_steps"], len(data.get("previews") or []))
                if seen and seen[-1][0] == "progress":
                    seen[-1] = (name, detail)
                else:
                    seen.append((name, detail))
            elif name == "completed":
                seen.append((name, len(data["result"]["data"])))
            else:
                seen.append((name, data.get("error", {}).get("code")))
            if name in ("completed", "failed", "cancelled"):
                break
    assert steps == sorted(set(steps)), steps
    return seen
