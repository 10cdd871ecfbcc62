"""The procedural shapes dataset is seeded, draws what its captions say, and holds out a
fixed set of combinations whose every word is still seen in training."""

from __future__ import annotations

import random

import numpy as np
import pytest

from recipes.shapes.dataset import (
    BACKGROUND_COLOURS,
    HELD_OUT_COMBINATIONS,
    PALETTE,
    SHAPE_COLOURS,
    SHAPES,
    all_combinations,
    caption,
    sample_batch,
    sample_shape,
    training_combinations,
)


def test_same_seed_same_samples_and_another_seed_differs() -> None:
    first, first_samples = sample_batch(random.Random(7), 8)
    again, again_samples = sample_batch(random.Random(7), 8)
    other, _ = sample_batch(random.Random(8), 8)
    np.testing.assert_array_equal(first, again)
    assert [s.caption for s in first_samples] == [s.caption for s in again_samples]
    assert not np.array_equal(first, other)
    assert first.shape == (8, 3, 64, 64)
    assert first.dtype == np.float32
    assert first.min() >= -1.0
    assert first.max() <= 1.0


def test_captions_match_the_drawn_pixels() -> None:
    rng = random.Random(0)
    for _ in range(60):
        sample = sample_shape(rng, all_combinations())
        pixels = np.asarray(sample.image)
        x, y = (round(v) for v in sample.center)
        # The bounding box's centre is inside every shape drawn (even the triangle and star).
        assert tuple(pixels[y, x]) == PALETTE[sample.colour], sample.caption
        for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
            assert tuple(corner) == PALETTE[sample.background], sample.caption
        # The shape's colour covers a share of the image that fits its drawn size.
        share = (pixels == PALETTE[sample.colour]).all(-1).mean()
        assert 0.3 * (sample.size / 64) ** 2 < share <= (sample.size / 64) ** 2 + 0.01


def test_caption_wording() -> None:
    assert caption("circle", "red", "blue") == "a red circle on a blue background"
    assert caption("star", "orange", "black") == "an orange star on a black background"


def test_vocabulary_sizes() -> None:
    assert len(SHAPES) >= 4
    assert len(SHAPE_COLOURS) >= 8
    assert len(BACKGROUND_COLOURS) >= 6


def test_held_out_combinations_are_never_drawn_for_training() -> None:
    training = set(training_combinations())
    assert set(all_combinations()) >= HELD_OUT_COMBINATIONS
    assert not HELD_OUT_COMBINATIONS & training
    assert len(HELD_OUT_COMBINATIONS) == 36
    rng = random.Random(3)
    assert all(sample_shape(rng).combination in training for _ in range(300))


def test_held_out_combinations_are_made_of_words_seen_in_training() -> None:
    training = training_combinations()
    seen_pairs = {(colour, background) for _, colour, background in training}
    for shape, colour, background in HELD_OUT_COMBINATIONS:
        assert any(c[0] == shape for c in training)
        assert any(c[1] == colour for c in training)
        assert any(c[2] == background for c in training)
        # The colour-on-background pair itself is seen, with other shapes.
        assert (colour, background) in seen_pairs


def test_unknown_names_are_rejected_with_the_valid_ones() -> None:
    from recipes.shapes.dataset import draw_shape

    with pytest.raises(ValueError, match="unknown shape 'hexagon'; valid: circle"):
        draw_shape("hexagon", "red", "blue", size=30, center=(32, 32))
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        draw_shape("circle", "teal", "blue", size=30, center=(32, 32))
