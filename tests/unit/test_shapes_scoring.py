"""The shapes scorer reads ground-truth dataset images correctly, so a low score for a model
means the model, not the scorer."""

from __future__ import annotations

import random

import numpy as np

from recipes.shapes.dataset import (
    PALETTE,
    all_combinations,
    draw_shape,
    ring_combinations,
    sample_shape,
)
from recipes.shapes.scoring import NO_SHAPE, convex_hull_area, read_shape


def test_scorer_reads_ground_truth_images() -> None:
    rng = random.Random(11)
    combos = all_combinations()  # held-out combinations too: the scorer knows no split
    samples = [sample_shape(rng, combos) for _ in range(240)]
    readings = [read_shape(s.image) for s in samples]
    for metric, attribute in (("colour", "colour"), ("background", "background"),
                              ("shape", "shape")):
        correct = sum(getattr(r, attribute) == getattr(s, attribute)
                      for r, s in zip(readings, samples, strict=True))
        assert correct / len(samples) >= 0.99, metric


def test_every_shape_at_both_size_extremes() -> None:
    for shape in ("circle", "square", "triangle", "star"):
        for size in (26, 46):
            image = draw_shape(shape, "pink", "green", size=size, center=(31.3, 33.7))
            reading = read_shape(image)
            assert (reading.shape, reading.colour, reading.background) == (shape, "pink", "green")


def test_rings_read_as_rings_and_a_gap_in_a_filled_shape_does_not() -> None:
    # Rings are the ring adapter's shape: every colour pair, both size extremes.
    rng = random.Random(5)
    combos = ring_combinations(held_out=False) + ring_combinations(held_out=True)
    for sample in [sample_shape(rng, combos) for _ in range(90)]:
        reading = read_shape(sample.image)
        assert (reading.shape, reading.colour, reading.background) == sample.combination
    for size in (26, 46):
        assert read_shape(draw_shape("ring", "pink", "green", size=size, center=(31.3, 33.7))
                          ).shape == "ring"
    # A hole in a square or star is not a ring: only a holed circle is.
    for shape in ("square", "star"):
        image = np.asarray(draw_shape(shape, "red", "white", size=46, center=(32, 32))).copy()
        image[29:36, 29:36] = PALETTE["white"]
        reading = read_shape(image)
        assert reading.holes > 0.0 and reading.shape == shape


def test_flat_image_has_no_shape() -> None:
    flat = np.full((64, 64, 3), PALETTE["blue"], dtype=np.uint8)
    reading = read_shape(flat)
    assert reading.background == "blue"
    assert reading.shape == NO_SHAPE
    assert reading.colour == NO_SHAPE


def test_largest_region_wins_over_specks() -> None:
    image = np.asarray(draw_shape("square", "red", "white", size=30, center=(32, 32))).copy()
    image[2:5, 2:5] = PALETTE["red"]  # a speck of the shape's colour, not touching it
    assert read_shape(image).shape == "square"


def test_convex_hull_area_counts_pixels_as_unit_squares() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:8] = True  # a 4x5 rectangle
    assert convex_hull_area(mask) == 20.0
    mask[:] = False
    mask[5, 5] = True
    assert convex_hull_area(mask) == 1.0
