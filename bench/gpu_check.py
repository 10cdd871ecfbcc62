"""GPU check: everything a GPU replica depends on, in one short run (<= 8 minutes on an H200).

    make gpu-check                              (= python bench/gpu_check.py)
    python bench/gpu_check.py [--budget-s 420] [--out DIR] [--scratch DIR]
                              [--only PREFIX ...] [--skip PREFIX ...]
    python bench/gpu_check.py --smoke           the same code at tiny size on the CPU (<= 60 s;
                                                `make test` runs it)

Real-size architectures with random weights (nothing is downloaded): SD 1.5 (CLIP ViT-L/14
text encoder, 860M UNet, VAE) and FLUX.2-klein-4B (its 3.9B transformer and 32-channel VAE,
with Qwen3-4B as the text encoder), written once into the scratch folder by
`blockserve tiny-model FAMILY DIR --size real --device cuda` (bfloat16, about 2 and 16 GiB).
In order, cheapest first, each printed as it finishes:

    environment          GPU, memory, versions
    oom_retry            ComponentsManager's retry after a real CUDA out-of-memory, and its
                         rollback when the retry fails too
    sd.checkpoint        write (or reuse) the real-size checkpoint
    sd.load              the service registry loads it (bfloat16, on the GPU)
    sd.parity.bfloat16   our pipeline vs diffusers' on the same weights and seed (max abs
                         diff), peak memory per component in each
    sd.speed.bfloat16    ms per image at 512x512, 20 steps, vs diffusers (interleaved)
    sd.engine            the engine's throughput at batch 1/2/4/8; batched vs alone images
    sd.alone             max_batch_size 1: each job alone, the same bytes as a lone run
    sd.step_scheduling   step- vs request-level scheduling under open-loop Poisson load
                         (4- and 20-step jobs, half and half): p95 per class, the onset
                         and capacity goals of bench/open_loop.py
    sd.offload_budget    auto offload under a budget of one model: moves, same image
    sd.parity.float16, sd.speed.float16
    weight_pool          Ray: two replicas with 0.25 GPU each build the VAE from one pool
                         entry, idle offload frees the device, the pool brings it back
    flux2-klein.*        the same for FLUX.2 [klein] at 1024x1024, 4 steps (no step_scheduling)

`--budget-s` (420 s by default: with the grace and the imports, under 8 minutes) stops
cleanly: a check is skipped when too little time is left, long ones stop
between their own steps, and a watchdog ends the run `--grace-s` after the budget. The JSON
and markdown reports (gpu_check.json, gpu_check.md) go to `--out`, default $OUT when set,
else bench/results/gpu-check-MODE; they are rewritten after every check. Exit status: 0 all
passed, 1 a check failed, 2 some were skipped, 3 stopped by the watchdog.

Setup on a machine without internet: the repository's .venv (`make venv`), or any Python with
torch, diffusers, transformers, fastapi, pydantic and pyyaml (ray for `weight_pool`, else that
check is skipped); `make gpu-wheels` downloads what a bare CUDA image lacks into .whl/ (see
the README).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from gpu_checks.engine import check_alone, check_throughput  # noqa: E402
from gpu_checks.environment import (  # noqa: E402
    check_environment,
    describe,
    imported_distributions,
)
from gpu_checks.memory import check_oom_retry  # noqa: E402
from gpu_checks.pipelines import FamilyPlan, FamilyRun  # noqa: E402
from gpu_checks.runner import Budget, Check, Outcome, Report, Runner, log  # noqa: E402
from gpu_checks.scheduling import check_step_scheduling  # noqa: E402
from gpu_checks.weight_pool import check_weight_pool  # noqa: E402

FULL_PLANS = (
    FamilyPlan("sd", "real", 512, 512, 20, 7.5, ("bfloat16", "float16"), speed_rounds=3,
               engine_batches=(1, 2, 4, 8), engine_rounds=2, step_loads=(0.25, 0.5, 0.8, 1.1),
               step_run_seconds=10.0, step_lone_repeats=3),
    FamilyPlan("flux2-klein", "real", 1024, 1024, 4, None, ("bfloat16", "float16"),
               speed_rounds=3, engine_batches=(1, 2, 4, 8), engine_rounds=2),
)
# The same checks at tiny size on the CPU: float32 (what the unit tests hold) and bfloat16.
# Two batch sizes are enough to exercise the engine check's logic there.
SMOKE_PLANS = (
    FamilyPlan("sd", "tiny", 64, 64, 4, 7.5, ("float32", "bfloat16"), speed_rounds=1,
               engine_batches=(1, 4), engine_rounds=1, step_loads=(0.5,), step_run_seconds=2.0),
    FamilyPlan("flux2-klein", "tiny", 32, 32, 2, None, ("float32", "bfloat16"), speed_rounds=1,
               engine_batches=(1, 4), engine_rounds=1),
)
# Seconds a check needs at least on the GPU (skipped with less left); the smoke run's are 1.
MIN_SECONDS = {"checkpoint": 20, "load": 10, "parity": 10, "speed": 15, "engine": 30,
               "alone": 15, "step_scheduling": 60, "offload_budget": 10, "weight_pool": 30}
FLUX_MIN_SECONDS = {"checkpoint": 90, "load": 30, "parity": 15, "speed": 30, "engine": 60,
                    "alone": 30, "offload_budget": 15}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny size on the CPU: the same code paths in under a minute")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the checks, from the first one (default 420; "
                             "--smoke: 90)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="the watchdog stops the run this long after the budget")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default $OUT, else bench/results/gpu-check-MODE)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where checkpoints are written once (default "
                             "$TMPDIR/blockserve-gpu-check)")
    parser.add_argument("--device", default=None,
                        help="default cuda (the full check) or cpu (--smoke)")
    parser.add_argument("--only", nargs="*", default=[], metavar="PREFIX",
                        help="run only checks whose name starts with one of these")
    parser.add_argument("--skip", nargs="*", default=[], metavar="PREFIX",
                        help="leave out checks whose name starts with one of these")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 90.0 if args.smoke else 420.0
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.grace_s < 0:
        parser.error(f"--grace-s must be >= 0, got {args.grace_s:g}")
    args.device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: the full check needs one (--smoke runs on the CPU)")
    mode = "smoke" if args.smoke else "full"
    if args.out is None:
        env_out = os.environ.get("OUT")
        args.out = Path(env_out) if env_out else ROOT / "bench" / "results" / f"gpu-check-{mode}"
    if args.scratch is None:
        args.scratch = Path(tempfile.gettempdir()) / "blockserve-gpu-check"
    return args


def family_checks(run: FamilyRun, minimum: dict[str, float], before_load: Callable[[], None]
                  ) -> list[Check]:
    """A family's checks in order (module docstring); the dtype cast comes after every check
    that needs the weights as loaded."""
    plan, family = run.plan, run.plan.family
    first, second = plan.dtypes
    device = run.device

    def load() -> Outcome:
        before_load()
        return run.load()

    def engine() -> Outcome:
        assert run.engine is not None
        return check_throughput(run.engine, plan.engine_batches, plan.engine_rounds, run.budget,
                                must_match_alone=device.type == "cpu")

    def alone() -> Outcome:
        assert run.engine is not None
        return check_alone(run.engine, run.alone_model_name, jobs=4,
                           must_match_batched=device.type == "cpu")

    def step_scheduling() -> Outcome:
        assert run.engine is not None
        return check_step_scheduling(run.engine, run.request_model_name, run.budget,
                                     plan.step_loads, plan.step_run_seconds,
                                     plan.step_lone_repeats)

    name = f"{family}."
    scheduling = [Check(name + "step_scheduling", step_scheduling, minimum["step_scheduling"],
                        needs=(name + "engine",))] if plan.step_loads else []
    return [
        Check(name + "checkpoint", run.write, minimum["checkpoint"]),
        Check(name + "load", load, minimum["load"], needs=(name + "checkpoint",)),
        Check(name + f"parity.{first}", lambda: run.parity(first), minimum["parity"],
              needs=(name + "load",)),
        Check(name + f"speed.{first}", lambda: run.speed(first), minimum["speed"],
              needs=(name + f"parity.{first}",)),
        Check(name + "engine", engine, minimum["engine"], needs=(name + "load",)),
        Check(name + "alone", alone, minimum["alone"], needs=(name + "engine",)),
        *scheduling,
        Check(name + "offload_budget", run.offload_budget, minimum["offload_budget"],
              needs=(name + f"parity.{first}",)),
        Check(name + f"parity.{second}", lambda: run.parity(second), minimum["parity"],
              needs=(name + "load",)),
        Check(name + f"speed.{second}", lambda: run.speed(second), minimum["speed"],
              needs=(name + f"parity.{second}",)),
    ]


def build_checks(args: argparse.Namespace, budget: Budget) -> list[Check]:
    device = args.device
    plans = SMOKE_PLANS if args.smoke else FULL_PLANS
    # On a GPU the real-size models are built there (seconds, not minutes on the CPU).
    runs = [FamilyRun(plan, device, args.scratch, budget) for plan in plans]
    sd, flux = runs

    def scaled(minimum: dict[str, float]) -> dict[str, float]:
        return dict.fromkeys(minimum, 1.0) if args.smoke else minimum

    def release(*others: FamilyRun) -> Callable[[], None]:
        def go() -> None:
            for other in others:
                other.close()
        return go

    checks = [
        Check("environment", lambda: check_environment(device)),
        Check("oom_retry", lambda: check_oom_retry(device, 4 if args.smoke else 512)),
        *family_checks(sd, scaled(MIN_SECONDS), release()),
        Check("weight_pool", lambda: check_weight_pool(
            sd.checkpoint, sd.plan.dtypes[0], device,
            latent_side=sd.plan.height // (4 if args.smoke else 8)),
            scaled(MIN_SECONDS)["weight_pool"], needs=("sd.checkpoint",)),
        *family_checks(flux, scaled(FLUX_MIN_SECONDS), release(sd)),
    ]
    # A check whose prerequisite is left out is reported as skipped, saying which.
    return [c for c in checks
            if (not args.only or c.name.startswith(tuple(args.only)))
            and not (args.skip and c.name.startswith(tuple(args.skip)))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "full"
    if args.smoke:
        # Tiny models gain nothing from more threads, and on a shared machine a second thread
        # waiting for a busy core makes every op many times slower.
        torch.set_num_threads(1)
    budget = Budget(args.budget_s)
    log(f"GPU check ({mode}) on {args.device}: budget {args.budget_s:.0f}s (+{args.grace_s:.0f}s"
        f" grace), report in {args.out}, checkpoints in {args.scratch}")
    report = Report(args.out, {
        "mode": mode, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s, "command": " ".join(["python bench/gpu_check.py",
                                                        *(argv if argv is not None
                                                          else sys.argv[1:])]),
        "environment": describe(args.device)})
    checks = build_checks(args, budget)
    code = Runner(budget, report, args.grace_s).run(checks)
    report.meta["imported_distributions"] = imported_distributions()
    report.write("finished", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
