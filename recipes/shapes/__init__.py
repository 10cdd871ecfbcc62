"""The "shapes" toy world: a procedural dataset of coloured shapes, the recipe that trains a
tiny Stable Diffusion model on it on a CPU, and an image-analysis scorer that measures whether
generated images show what their prompts ask for.

    from recipes.shapes import train_shapes, evaluate_shapes, format_report
    train_shapes("out/tiny-shapes-sd", seed=0)            # ~47 minutes on one CPU core
    print(format_report(evaluate_shapes("out/tiny-shapes-sd")))

or, from a shell, `blockserve train-shapes OUT_DIR` and `blockserve eval-shapes [CHECKPOINT]`.
The committed result lives in `assets/tiny-shapes-sd/`. `train_ring_lora` (`blockserve
train-lora-shapes OUT_DIR`) trains a LoRA adapter that teaches it rings, a shape it never saw
(`assets/ring-lora/`). Nothing here is imported by `import blocks`.
"""

from recipes.shapes.dataset import HELD_OUT_COMBINATIONS, caption
from recipes.shapes.evaluation import (
    ShapesReport,
    evaluate_shapes,
    evaluation_combinations,
    format_report,
    load_shapes_pipeline,
    render_grid,
    ring_evaluation_combinations,
)
from recipes.shapes.lora_training import RingLoraConfig, train_ring_lora
from recipes.shapes.training import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    ShapesTrainingConfig,
    train_shapes,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_STEPS",
    "HELD_OUT_COMBINATIONS",
    "RingLoraConfig",
    "ShapesReport",
    "ShapesTrainingConfig",
    "caption",
    "evaluate_shapes",
    "evaluation_combinations",
    "format_report",
    "load_shapes_pipeline",
    "render_grid",
    "ring_evaluation_combinations",
    "train_ring_lora",
    "train_shapes",
]
