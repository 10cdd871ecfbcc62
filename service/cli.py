"""The `blockserve` command line.

    blockserve serve [--models FILE] [--host 127.0.0.1] [--port 8000]   the HTTP API
    blockserve generate "a red circle" -o out.png [--model M] [--steps N] [--seed S]
                        [--size WxH] [--image in.png] [--mask m.png] [--step-cache METHOD]
                        one image, no server
    blockserve models [--models FILE]                                  the configured models
    blockserve tiny-model FAMILY OUT_DIR [--seed 0] [--OPTION ...] [--size real] [--device cuda]
                        a random-weight checkpoint of a family (--OPTION: a variant the family
                        offers; an unknown one is answered with the list); --size real: the
                        family's published architecture in bfloat16, for GPU checks
    blockserve train-shapes OUT_DIR [--seed 0] [--vae-steps N] [--unet-steps N] [--threads 1]
                        [--overwrite]
                        train the tiny shapes model on the CPU (47 min at the defaults)
    blockserve train-lora-shapes OUT_DIR [--base CHECKPOINT] [--seed 0] [--steps N]
                        [--overwrite] [--models FILE]
                        train the "ring" LoRA adapter on the shapes model on the CPU
    blockserve eval-shapes [CHECKPOINT] [--prompts 50] [--steps N] [--guidance-scale G]
                        [--seed 0] [--grid grid.png] [--per-prompt] [--models FILE]
                        [--step-cache METHOD] [--lora FILE_OR_DIR] [--rings]
                        score prompt adherence; exit 1 below the thresholds
                        (CHECKPOINT: the models file's default model; --lora: with that
                        adapter at scale 1; --rings: ring prompts, the ring adapter's shape)

The models file defaults to BLOCKSERVE_MODELS_FILE, else the packaged one (service/models.yaml).
Argument errors exit with status 2 and a message naming the argument, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GRID_IMAGES = 32  # eval-shapes --grid: 4 rows of 8, enough to see every shape and colour
COMPARISON_COLUMNS = 8  # eval-shapes --lora --grid: 8 prompts, the base model's row above


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 64x64, got {text!r}") from None
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise argparse.ArgumentTypeError(f"size sides must be in 8..4096, got {text!r}")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # `not >=` also catches nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from service import __version__

    parser = argparse.ArgumentParser(prog="blockserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"blockserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP image-generation API")
    serve.add_argument("--models", type=Path, help="models file (YAML)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ray", action="store_true",
                       help="distributed mode: start a local Ray cluster (loopback) and serve "
                            "heavy blocks as Ray Serve deployments")
    serve.add_argument("--ray-config", type=Path,
                       help="with --ray: a Serve config (default deployments/serve_config.yaml)")
    serve.add_argument("--ray-num-cpus", type=float,
                       help="with --ray: CPUs the local Ray cluster may use (default: all)")

    generate = commands.add_parser(
        "generate", help="make one image in this process from a configured model (no server)"
    )
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                          help="where to write the image (.png, .jpg or .webp)")
    generate.add_argument("--models", type=Path, help="models file (YAML)")
    generate.add_argument("--model", help="a configured model (default: the first)")
    generate.add_argument("--steps", type=_positive, help="num_inference_steps")
    generate.add_argument("--seed", type=int, help="random when absent; printed either way")
    generate.add_argument("--size", type=_size, help="WxH, one of the model's sizes")
    generate.add_argument("--guidance-scale", type=float)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--scheduler", help="one of the model's schedulers")
    generate.add_argument("--image", type=Path, help="edit this image (image-to-image)")
    generate.add_argument("--mask", type=Path, help="with --image: inpaint where transparent")
    generate.add_argument("--strength", type=float, help="with --image: how much to change")
    generate.add_argument("--step-cache", metavar="METHOD",
                          help="off or one of the model's step-cache methods (default: the "
                               "models file's)")

    models = commands.add_parser("models", help="list the configured models")
    models.add_argument("--models", type=Path, help="models file (YAML)")

    # The families (and their options) are known only once `blocks` is imported, which this
    # parser avoids: FAMILY and the --OPTION flags are checked against the family when run.
    tiny = commands.add_parser(
        "tiny-model", help="write a tiny random-weight checkpoint of a family",
        description="Write a tiny random-weight checkpoint of FAMILY to OUT_DIR. Extra "
                    "--OPTION flags pick the family's variants (see the error for a list).",
    )
    tiny.add_argument("family", help="a family with a tiny checkpoint (the models file's names)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size", choices=["tiny", "real"], default="tiny",
                      help="real: the family's published architecture (random weights, bfloat16)")
    tiny.add_argument("--device", default="cpu",
                      help="where the models are built (cuda: seconds instead of minutes at "
                           "--size real); default cpu")

    # Defaults left as None are recipes.shapes' own (the committed checkpoint's), so they are
    # written down once and torch is not imported just to build this parser.
    train = commands.add_parser(
        "train-shapes", help="train the tiny shapes model on the CPU"
    )
    train.add_argument("out_dir", type=Path, help="where to write it (missing or empty)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=_positive,
                       help="stage 1 steps (default: the committed checkpoint's)")
    train.add_argument("--unet-steps", type=_positive,
                       help="stage 2 steps (default: the committed checkpoint's)")
    train.add_argument("--threads", type=_positive, default=1,
                       help="torch threads; the result depends on it (default 1)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace OUT_DIR's checkpoint once the new one is complete")

    lora = commands.add_parser(
        "train-lora-shapes", help="train the ring LoRA adapter on the shapes model on the CPU"
    )
    lora.add_argument("out_dir", type=Path, help="where to write it (missing or empty)")
    lora.add_argument("--base", type=Path,
                      help="the shapes checkpoint (default: the models file's default model)")
    lora.add_argument("--models", type=Path, help="models file (for the default --base)")
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--steps", type=_positive,
                      help="training steps (default: the committed adapter's)")
    lora.add_argument("--overwrite", action="store_true",
                      help="replace OUT_DIR's adapter once the new one is complete")

    evaluate = commands.add_parser(
        "eval-shapes", help="score a shapes checkpoint's prompt adherence"
    )
    evaluate.add_argument("checkpoint", nargs="?", type=Path,
                          help="checkpoint folder (default: the models file's default model)")
    evaluate.add_argument("--models", type=Path,
                          help="models file whose default model is evaluated when no "
                               "CHECKPOINT is given")
    evaluate.add_argument("--prompts", type=_positive, default=50,
                          help="how many prompts, alternately held-out and seen combinations")
    evaluate.add_argument("--steps", type=_positive, help="default: the trained default (20)")
    evaluate.add_argument("--guidance-scale", type=_non_negative,
                          help="default: the trained default (5)")
    evaluate.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    evaluate.add_argument("--step-cache", metavar="METHOD",
                          help="off (default) or deepcache: skip the UNet's deep levels "
                               "between full steps")
    evaluate.add_argument("--grid", type=Path,
                          help=f"write the first {GRID_IMAGES} images as a labelled grid (PNG); "
                               f"with --lora: the first {COMPARISON_COLUMNS} prompts, the base "
                               "model's images above the adapter's")
    evaluate.add_argument("--per-prompt", action="store_true",
                          help="also print what was read for each prompt")
    evaluate.add_argument("--lora", type=Path, metavar="FILE_OR_DIR",
                          help="generate with this LoRA adapter at scale 1 (diffusers or "
                               "kohya file, or a folder holding pytorch_lora_weights.safetensors)")
    evaluate.add_argument("--rings", action="store_true",
                          help="ring prompts (the ring adapter's shape) instead of the base "
                               "model's shapes")
    return parser


def run_tiny_model(args: argparse.Namespace, extra: list[str],
                   parser: argparse.ArgumentParser) -> None:
    import torch

    from blocks.families import families

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    writers = {name: family for name, family in families().items() if family.tiny_writer}
    family = writers.get(args.family)
    if family is None:
        parser.error(f"argument family: no tiny checkpoint for family {args.family!r}; "
                     f"choose from {', '.join(writers)}")
    allowed = {f"--{option}": option for option in family.tiny_options}
    unknown = [flag for flag in extra if flag not in allowed]
    if unknown:
        parser.error(f"unrecognized arguments for family {family.name!r}: {' '.join(unknown)}; "
                     f"its options: {', '.join(allowed) or '(none)'}")
    options = {allowed[flag]: True for flag in extra}
    try:
        path = family.write_tiny(args.out_dir, seed=args.seed, size=args.size, device=device,
                                 **options)
    except ValueError as error:  # a variant the size does not offer (the family's writer says)
        parser.error(f"--size {args.size}: {error}")
    print(f"wrote {path}")


def _out_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """A training command's OUT_DIR, refused unless missing, empty or --overwrite."""
    out = args.out_dir
    if out.exists() and not out.is_dir():
        parser.error(f"OUT_DIR {out} is a file")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"OUT_DIR {out} must be missing or an empty folder (--overwrite replaces "
                     "it; an interrupted run leaves nothing there)")
    return out


def run_train_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    out = _out_dir(args, parser)
    from recipes.shapes import training

    start = time.perf_counter()
    path = training.train_shapes(out, seed=args.seed, vae_steps=args.vae_steps,
                                 unet_steps=args.unet_steps, threads=args.threads,
                                 overwrite=args.overwrite)
    print(f"wrote {path} ({(time.perf_counter() - start) / 60:.1f} min)")


def run_train_lora_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    out = _out_dir(args, parser)
    base = args.base or _default_checkpoint(args, parser)
    if not (base / "model_index.json").is_file():
        parser.error(f"--base {base} is not a checkpoint folder (no model_index.json)")
    from recipes.shapes import lora_training

    config = lora_training.RingLoraConfig(seed=args.seed)
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    start = time.perf_counter()
    path = lora_training.train_ring_lora(base, out, config, overwrite=args.overwrite)
    print(f"wrote {path} ({(time.perf_counter() - start) / 60:.1f} min)")


def run_eval_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Prints the report; 0 when every metric meets its threshold, else 1."""
    if args.grid is not None and args.grid.suffix.lower() != ".png":
        parser.error(f"--grid must end in .png, got {args.grid}")
    checkpoint = args.checkpoint or _default_checkpoint(args, parser)
    if not (checkpoint / "model_index.json").is_file():
        parser.error(f"CHECKPOINT {checkpoint} is not a checkpoint folder (no model_index.json)")
    if args.lora is not None and not args.lora.exists():
        parser.error(f"--lora {args.lora}: no such file or folder")
    from recipes.shapes import evaluation
    from service.torch_threads import apply_torch_threads

    apply_torch_threads()
    try:  # before loading anything, so a bad --prompts fails at once
        choose = (evaluation.ring_evaluation_combinations if args.rings
                  else evaluation.evaluation_combinations)
        prompts = choose(args.prompts)
    except ValueError as error:
        parser.error(f"--prompts {args.prompts}: {error}")
    from blocks.lora import LoraFileError
    from blocks.step_cache import InvalidStepCache

    pipeline, label = None, checkpoint
    if args.lora is not None:
        pipeline = evaluation.load_shapes_pipeline(checkpoint)
        try:
            pipeline.load_lora_weights(str(args.lora), adapter_name="evaluated")
        except LoraFileError as error:
            parser.error(f"--lora {args.lora}: {error}")
        label = f"{checkpoint} + LoRA {args.lora}"

    options = {"steps": args.steps, "guidance_scale": args.guidance_scale}
    try:
        report = evaluation.evaluate_shapes(
            label, prompts, seed=args.seed, progress=True, step_cache=args.step_cache,
            pipeline=pipeline,
            **{k: v for k, v in options.items() if v is not None}
        )
    except InvalidStepCache as error:
        parser.error(f"--step-cache: {error}")
    print(evaluation.format_report(report, per_prompt=args.per_prompt))
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        shown = report.results[:GRID_IMAGES]
        if args.lora is not None:  # the base model's images for the same prompts and seeds
            shown = report.results[:COMPARISON_COLUMNS]
            base = evaluation.evaluate_shapes(
                checkpoint, [r.combination for r in shown], seed=args.seed,
                step_cache=args.step_cache,
                **{k: v for k, v in options.items() if v is not None})
            shown = base.results + shown
        evaluation.render_grid(shown).save(args.grid, optimize=True)
        print(f"wrote {args.grid}")
    return 0 if report.passed else 1


def _default_checkpoint(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """The default model's folder: the models file says once where the shapes model lives."""
    _, models = _settings_and_models(args, parser)
    config = models.models[models.default_model]
    if config.path is None:
        parser.error(f"the default model {config.name!r} has no checkpoint; give CHECKPOINT")
    return Path(config.path)


def _settings_and_models(args: argparse.Namespace, parser: argparse.ArgumentParser,
                         **overrides: object) -> tuple[Any, Any]:
    from service.models_file import ModelsFileError, load_models_file
    from service.settings import Settings, SettingsError

    try:
        settings = Settings.from_env(models_file=args.models, **overrides)
        return settings, load_models_file(settings.models_file)
    except (SettingsError, ModelsFileError) as error:
        parser.exit(2, f"blockserve {args.command}: error: {error}\n")


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import logging

    import uvicorn

    from service.app import create_app

    settings, models = _settings_and_models(
        args, parser, host=args.host, port=args.port, log_level=args.log_level
    )
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", False):
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            parser.exit(2, "blockserve serve --ray: error: ray is not installed; install the "
                           "Ray extra: pip install 'blockserve[ray]'\n")
        from service.ray_placement import serve_ray

        serve_ray(settings, args.ray_config, num_cpus=args.ray_num_cpus)
        return
    from service.torch_threads import apply_torch_threads

    apply_torch_threads(settings.workers, settings.torch_threads)
    from service.http_server import uvicorn_options

    app = create_app(settings, models)
    auth = "on" if settings.api_keys else "off"
    print(f"blockserve: serving {', '.join(models.models)} on "
          f"http://{settings.host}:{settings.port} (auth {auth}; docs at /docs)", flush=True)
    uvicorn.run(app, **uvicorn_options(settings))


def run_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    settings, models = _settings_and_models(args, parser)
    print(f"models file: {settings.models_file}")
    for index, (name, config) in enumerate(models.models.items()):
        default = " (default)" if index == 0 else ""
        print(f"{name}{default}: family {config.family}, path {config.path or '(built in)'}, "
              f"sizes {', '.join(config.allowed_sizes)}, steps {config.defaults.steps} "
              f"(max {config.limits.max_steps}), n up to {config.limits.max_n}, "
              f"{config.dtype} on {config.device}")


def run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from pydantic import ValidationError
    from tqdm.auto import tqdm

    from service.engine import run_job
    from service.errors import APIError, validation_error
    from service.image_io import decode_image, encode_image
    from service.registry import ModelRegistry
    from service.schemas import ImageEditRequest, ImageGenerationRequest
    from service.torch_threads import apply_torch_threads
    from service.validation import build_job, edit_workflow, requested_size, resolve_model

    settings, models = _settings_and_models(args, parser)
    apply_torch_threads(1, settings.torch_threads)
    if args.mask is not None and args.image is None:
        parser.error("--mask needs --image")
    suffix = args.output.suffix.lower().lstrip(".") or "png"
    output_format = {"jpg": "jpeg"}.get(suffix, suffix)
    if output_format not in ("png", "jpeg", "webp"):
        parser.error(f"-o/--output must end in .png, .jpg, .jpeg or .webp, got {args.output}")
    fields = {
        "prompt": args.prompt, "model": args.model, "num_inference_steps": args.steps,
        "seed": args.seed, "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt, "scheduler": args.scheduler,
        "size": f"{args.size[0]}x{args.size[1]}" if args.size else None,
        "step_cache": args.step_cache,
    }
    request_class = ImageGenerationRequest if args.image is None else ImageEditRequest
    edit_fields = {} if args.image is None else {"image": "(file)", "strength": args.strength}
    registry = ModelRegistry(models)
    try:
        request = request_class(**fields, **edit_fields)
        name = resolve_model(registry, request.model)
        requested_size(request.size, registry.config(name))  # before the model loads
        image = mask = None
        if args.image is not None:
            image = decode_image(_read(args.image, parser), "--image")
            if args.mask is not None:
                mask = decode_image(_read(args.mask, parser), "--mask")
        print(f"loading model {name} ...", file=sys.stderr)
        model = _load(registry, name, parser)
        workflow = "text2image" if image is None else edit_workflow(model, mask is not None)
        job = build_job(request, model, workflow, image, mask)
    except ValidationError as error:
        message = validation_error(error, request_class).message
        parser.exit(2, f"blockserve generate: error: {message}\n")
    except APIError as error:
        parser.exit(2, f"blockserve generate: error: {error.message}\n")
    with tqdm(total=job.steps, desc=f"{name} {workflow}", unit="step") as bar:
        job.listener = _ProgressBar(bar)
        result = run_job(registry, job)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(encode_image(result.images[0], output_format))
    print(f"wrote {args.output} ({job.width}x{job.height}, model {name}, seed {job.seed}, "
          f"{result.seconds:.2f}s)")


class _ProgressBar:
    """A job listener drawing a tqdm bar."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def queued(self, position: int) -> None: ...

    def started(self) -> None: ...

    def progress(self, step: int, total: int, previews: Any) -> None:
        self.bar.total = total
        self.bar.n = step
        self.bar.refresh()


def _load(registry: Any, name: str, parser: argparse.ArgumentParser) -> Any:
    try:
        return registry.load(name)
    except Exception as error:  # a broken checkpoint: say so, without a traceback
        parser.exit(1, f"blockserve generate: model {name!r} failed to load: {error}\n")


def _read(path: Path, parser: argparse.ArgumentParser) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        parser.error(f"cannot read {path}: {error.strerror}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "tiny-model":  # only a family's options are open-ended
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "tiny-model":
        run_tiny_model(args, extra, parser)
    elif args.command == "serve":
        run_serve(args, parser)
    elif args.command == "generate":
        run_generate(args, parser)
    elif args.command == "models":
        run_models(args, parser)
    elif args.command == "train-shapes":
        run_train_shapes(args, parser)
    elif args.command == "train-lora-shapes":
        run_train_lora_shapes(args, parser)
    elif args.command == "eval-shapes":
        return run_eval_shapes(args, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
