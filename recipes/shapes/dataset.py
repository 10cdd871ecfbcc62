"""Procedural "shapes" images and their captions, drawn on the fly from a seed.

Every sample is one flat-coloured shape (circle, square, triangle or star) of one palette
colour on a flat background of another, at a random position and size, captioned
"a red circle on a blue background". The images are drawn at 4x and box-filtered down, so
edges are anti-aliased.

Some (shape, colour, background) combinations are never drawn for training
(`HELD_OUT_COMBINATIONS`): evaluating on them measures whether a model composes words it has
seen in other combinations, rather than recalling captions it was trained on.

Shapes are upright and squares axis-aligned on purpose: the scorer in `recipes.shapes.scoring`
tells shapes apart by rotation-sensitive descriptors (extent), and a 64x64 model has no room to
spare for rotations. Nothing here touches torch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Shapes the base model never sees, taught by adapters (the ring LoRA, `recipes.shapes.
# lora_training`): a ring is a circle with a hole of the background colour in its middle.
ADAPTER_SHAPES: tuple[str, ...] = ("ring",)
RING_INNER_RATIO = 0.5  # hole diameter / ring diameter: the hole is 25% of the disc

# Colours far apart in RGB, so "nearest palette colour" is unambiguous for a slightly-off pixel.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (30, 160, 50),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 210),
    "purple": (140, 50, 180),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
# Every colour is used for shapes and for backgrounds (never both in one image).
SHAPE_COLOURS: tuple[str, ...] = COLOURS
BACKGROUND_COLOURS: tuple[str, ...] = COLOURS

# The shape's bounding box side, in pixels of a 64x64 image: large enough to be recognisable.
MIN_SIZE = 26
MAX_SIZE = 46
_MARGIN = 3  # pixels kept clear between the shape's bounding box and the image edge
_SUPERSAMPLE = 4
STAR_INNER_RATIO = 0.45  # inner/outer radius of the five-pointed star

Combination = tuple[str, str, str]  # (shape, colour, background)

# The held-out set: (shape, colour, background) with
# (SHAPES.index(shape) * 3 + COLOURS.index(colour) + COLOURS.index(background) * 2) % 10 == 0,
# i.e. 36 of the 360 combinations (10%). Because 3 * shape takes four distinct values mod 10,
# every (colour, background) pair is held out with at most one shape, so each held-out pair is
# still seen in training with the other shapes, and every word is seen in every role.
# Listed explicitly so that the set is fixed by this file, not by a formula's reading.
HELD_OUT_COMBINATIONS: frozenset[Combination] = frozenset(
    {
        ("circle", "red", "blue"), ("circle", "yellow", "cyan"), ("circle", "yellow", "black"),
        ("circle", "cyan", "green"), ("circle", "cyan", "white"), ("circle", "purple", "yellow"),
        ("circle", "purple", "pink"), ("circle", "white", "orange"), ("circle", "white", "purple"),
        ("square", "orange", "green"), ("square", "orange", "white"),
        ("square", "green", "yellow"), ("square", "green", "pink"), ("square", "blue", "orange"),
        ("square", "blue", "purple"), ("square", "pink", "red"), ("square", "pink", "blue"),
        ("square", "black", "cyan"),
        ("triangle", "red", "yellow"), ("triangle", "red", "pink"),
        ("triangle", "yellow", "orange"), ("triangle", "yellow", "purple"),
        ("triangle", "cyan", "red"), ("triangle", "cyan", "blue"), ("triangle", "purple", "cyan"),
        ("triangle", "purple", "black"), ("triangle", "white", "green"),
        ("star", "orange", "red"), ("star", "orange", "blue"), ("star", "green", "cyan"),
        ("star", "green", "black"), ("star", "blue", "green"), ("star", "blue", "white"),
        ("star", "pink", "yellow"), ("star", "black", "orange"), ("star", "black", "purple"),
    }
)


def all_combinations() -> list[Combination]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [
        (shape, colour, background)
        for shape in SHAPES
        for colour in SHAPE_COLOURS
        for background in BACKGROUND_COLOURS
        if colour != background
    ]


def training_combinations() -> list[Combination]:
    return [c for c in all_combinations() if c not in HELD_OUT_COMBINATIONS]


def ring_combinations(held_out: bool) -> list[Combination]:
    """("ring", colour, background) combinations in a fixed order: the 9 with
    (2 * colour + background) % 10 == 0 are held out of the ring adapter's training (`held_out`
    True), the other 81 are trained on."""
    return [
        ("ring", colour, background)
        for colour in SHAPE_COLOURS
        for background in BACKGROUND_COLOURS
        if colour != background
        and ((2 * COLOURS.index(colour) + COLOURS.index(background)) % 10 == 0) == held_out
    ]


def is_held_out(combination: Combination) -> bool:
    """Whether a combination was kept out of training (the base model's or the ring
    adapter's)."""
    if combination[0] == "ring":
        return combination in _RING_HELD_OUT
    return combination in HELD_OUT_COMBINATIONS


def caption(shape: str, colour: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class ShapeSample:
    """One drawn image and what it shows."""

    shape: str
    colour: str
    background: str
    size: int  # bounding-box side in pixels
    center: tuple[float, float]  # (x, y) in pixels
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)

    @property
    def combination(self) -> Combination:
        return (self.shape, self.colour, self.background)


def draw_shape(
    shape: str,
    colour: str,
    background: str,
    *,
    size: int,
    center: tuple[float, float],
    image_size: int = IMAGE_SIZE,
) -> Image.Image:
    """Draw one anti-aliased shape whose bounding box is `size` pixels wide, centred at `center`."""
    if shape not in SHAPES + ADAPTER_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES + ADAPTER_SHAPES)}")
    for name in (colour, background):
        if name not in PALETTE:
            raise ValueError(f"unknown colour {name!r}; valid: {', '.join(COLOURS)}")
    scale = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), PALETTE[background])
    draw = ImageDraw.Draw(canvas)
    cx, cy = center[0] * scale, center[1] * scale
    half = size * scale / 2
    fill = PALETTE[colour]
    if shape in ("circle", "ring"):
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        if shape == "ring":
            hole = half * RING_INNER_RATIO
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=PALETTE[background])
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        # Upright isosceles triangle filling its square bounding box.
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        draw.polygon(_star_points(cx, cy, half), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _star_points(cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """An upright five-pointed star whose bounding box is a `2 * half` square (stretched a
    little horizontally: a regular star's box is 1.05 times wider than tall)."""
    angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
    radii = [1.0 if i % 2 == 0 else STAR_INNER_RATIO for i in range(10)]
    raw = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]
    xs, ys = [p[0] for p in raw], [p[1] for p in raw]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [
        (cx + ((x - x0) / (x1 - x0) * 2 - 1) * half, cy + ((y - y0) / (y1 - y0) * 2 - 1) * half)
        for x, y in raw
    ]


def sample_shape(
    rng: random.Random,
    combinations: list[Combination] | None = None,
    image_size: int = IMAGE_SIZE,
) -> ShapeSample:
    """Draw one sample: a combination from `combinations` (default: the training ones), with
    a random size and a position that keeps the whole shape inside the image."""
    pool = combinations if combinations is not None else _TRAINING
    shape, colour, background = pool[rng.randrange(len(pool))]
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    low = _MARGIN + size / 2
    high = image_size - _MARGIN - size / 2
    center = (rng.uniform(low, high), rng.uniform(low, high))
    image = draw_shape(shape, colour, background, size=size, center=center, image_size=image_size)
    return ShapeSample(shape, colour, background, size, center, image)


def sample_batch(
    rng: random.Random, batch_size: int, combinations: list[Combination] | None = None
) -> tuple[np.ndarray, list[ShapeSample]]:
    """`batch_size` samples and their pixels as float32 in [-1, 1], shape (B, 3, H, W)."""
    samples = [sample_shape(rng, combinations) for _ in range(batch_size)]
    pixels = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples])  # (B, H, W, 3)
    pixels = pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, samples


_TRAINING = training_combinations()
_RING_HELD_OUT = frozenset(ring_combinations(held_out=True))
