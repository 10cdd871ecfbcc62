"""Locust users for blockserve's HTTP API, in a realistic mix: text-to-image generations, image
edits, and background jobs followed to the end over server-sent events.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000     (or: make loadtest)

Configured by environment variables (see `LoadMix.from_env`): the weight of each user class,
the model (default: the server's first), the size, steps and an API key. Black-box on purpose:
it imports nothing from blockserve and speaks only HTTP, so it runs against any deployment.
It does not check image content (the integration tests do); a request fails when its status is
not 200/202 or a job does not end `completed`.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from dataclasses import dataclass

from locust import HttpUser, between, events, task
from PIL import Image


@dataclass(frozen=True)
class LoadMix:
    """What the simulated users ask for. Weights are relative (locust picks user classes in
    proportion); 0 leaves a class out."""

    text_to_image_weight: int = 3
    image_edit_weight: int = 2
    streamed_job_weight: int = 1
    model: str | None = None        # None: the first model the server lists
    size: str | None = None         # None: the model's default
    steps: int | None = None        # None: the model's default
    api_key: str | None = None
    think_time_s: tuple[float, float] = (0.1, 0.5)

    @classmethod
    def from_env(cls) -> LoadMix:
        def weight(name: str, default: int) -> int:
            value = int(os.environ.get(name, default))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            return value

        steps = os.environ.get("LOADTEST_STEPS")
        return cls(
            text_to_image_weight=weight("LOADTEST_WEIGHT_TEXT2IMAGE", cls.text_to_image_weight),
            image_edit_weight=weight("LOADTEST_WEIGHT_EDIT", cls.image_edit_weight),
            streamed_job_weight=weight("LOADTEST_WEIGHT_STREAM", cls.streamed_job_weight),
            model=os.environ.get("LOADTEST_MODEL") or None,
            size=os.environ.get("LOADTEST_SIZE") or None,
            steps=int(steps) if steps else None,
            api_key=os.environ.get("BLOCKSERVE_API_KEY") or None,
        )


MIX = LoadMix.from_env()
PROMPTS = ("a red circle on a blue background", "a green square", "a yellow sunset over hills",
           "a purple cat in a hat", "an orange boat on grey water")
_model_of_host: dict[str, str] = {}


def _input_png(size: str | None) -> bytes:
    width, height = (int(side) for side in (size or "64x64").split("x"))
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


class BlockserveUser(HttpUser):
    """Shared setup: auth header, the model to use, request fields from the mix."""

    abstract = True
    wait_time = between(*MIX.think_time_s)

    def on_start(self) -> None:
        if MIX.api_key:
            self.client.headers["Authorization"] = f"Bearer {MIX.api_key}"
        host = self.host or ""
        if MIX.model:
            self.model = MIX.model
        elif host in _model_of_host:
            self.model = _model_of_host[host]
        else:
            listed = self.client.get("/v1/models", name="/v1/models").json()["data"]
            self.model = _model_of_host.setdefault(host, listed[0]["id"])

    def fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"model": self.model, "prompt": random.choice(PROMPTS),
                                     "seed": random.randrange(1 << 30)}
        if MIX.size:
            fields["size"] = MIX.size
        if MIX.steps:
            fields["num_inference_steps"] = MIX.steps
        return fields


class TextToImageUser(BlockserveUser):
    weight = MIX.text_to_image_weight

    @task
    def generate(self) -> None:
        self.client.post("/v1/images/generations", json=self.fields(),
                         name="/v1/images/generations")


class ImageEditUser(BlockserveUser):
    weight = MIX.image_edit_weight

    @task
    def edit(self) -> None:
        data = {key: str(value) for key, value in self.fields().items()}
        self.client.post("/v1/images/edits", data=data, name="/v1/images/edits",
                         files={"image": ("input.png", _input_png(MIX.size), "image/png")})


class StreamedJobUser(BlockserveUser):
    """POST /v1/jobs, then follow /v1/jobs/{id}/events until the job ends; the whole job is
    reported as one `JOB` request, timed from submission to its last event."""

    weight = MIX.streamed_job_weight

    @task
    def job(self) -> None:
        started = time.perf_counter()
        created = self.client.post("/v1/jobs", json=self.fields(), name="/v1/jobs")
        if created.status_code != 202:
            return  # already counted as a failure by locust
        job_id = created.json()["id"]
        outcome, length = None, 0
        with self.client.get(f"/v1/jobs/{job_id}/events", name="/v1/jobs/{id}/events",
                             stream=True, catch_response=True) as response:
            for line in response.iter_lines(decode_unicode=True):
                length += len(line or "")
                if line and line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                    if kind in ("completed", "failed", "cancelled"):
                        outcome = kind
                        break
            if outcome == "completed":
                response.success()
            else:
                response.failure(f"job {job_id} ended {outcome or 'without a final event'}")
        events.request.fire(
            request_type="JOB", name="job text2image (streamed)", response_length=length,
            response_time=(time.perf_counter() - started) * 1000, context={},
            exception=None if outcome == "completed" else RuntimeError(json.dumps(outcome)),
        )
