"""The naive baseline for `bench/serve_throughput.py`: what serving diffusers looks like without
an engine — FastAPI, one diffusers `StableDiffusionPipeline`, a lock, one request at a time.

It takes the subset of blockserve's `POST /v1/images/generations` body the benchmark sends
(prompt, n, size, num_inference_steps, guidance_scale, seed; b64_json only) and answers in the
same shape, so one load generator drives both servers. Images are encoded outside the lock, as
any sensible hand-written server would, so the baseline is not handicapped; there is no queue
bound, no batching, no cancellation and no validation beyond the types.

    python bench/baselines/naive_server.py CHECKPOINT_DIR --port 8001
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time

import torch
import uvicorn
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI
from pydantic import BaseModel


class GenerationRequest(BaseModel):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "64x64"
    num_inference_steps: int = 4
    guidance_scale: float = 7.5
    seed: int = 0


def create_app(checkpoint: str) -> FastAPI:
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    app = FastAPI(title="naive diffusers server")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/images/generations")
    def generate(body: GenerationRequest) -> dict:  # sync: FastAPI runs it on its threadpool
        width, height = (int(side) for side in body.size.split("x"))
        generators = [torch.Generator("cpu").manual_seed(body.seed + i) for i in range(body.n)]
        with lock:  # one request at a time on the one pipeline
            images = pipe(body.prompt, num_images_per_prompt=body.n, width=width, height=height,
                          num_inference_steps=body.num_inference_steps,
                          guidance_scale=body.guidance_scale, generator=generators).images
        data = []
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"),
                         "seed": body.seed + i})
        return {"created": int(time.time()), "data": data, "model": body.model or "naive",
                "size": body.size, "output_format": "png"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a diffusers Stable Diffusion checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
