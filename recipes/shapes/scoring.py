"""Reads back what a shapes image shows: background colour, shape colour and shape kind.

A deterministic image analysis in numpy, used to score generated images against their
prompts (`recipes.shapes.evaluation`):

1. colour segmentation: every pixel takes the nearest palette colour (RGB distance);
2. background = the most common colour on the image border;
3. shape colour = the most common non-background colour (a minimum share of the image is
   required, else no shape was drawn);
4. shape = the largest 4-connected region of the shape colour, classified by three
   descriptors: holes (the share of the region's filled outline that is enclosed non-shape
   pixels: a ring's hole is 25%, a filled shape's 0; a holed region whose filled outline reads
   as a circle is a ring, the shape only the ring adapter draws), solidity (area / convex-hull
   area: a star's points leave ~40% of its hull empty) and extent (area / bounding-box area:
   square ~1, circle ~pi/4, triangle ~1/2).

It assumes what `recipes.shapes.dataset` draws (one upright shape, axis-aligned squares, a flat
background) and does not try to read arbitrary images. The thresholds are midpoints between
the ideal shapes' descriptor values, fixed here, never tuned to a model's outputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from recipes.shapes.dataset import COLOURS, PALETTE

NO_SHAPE = "none"
# A shape smaller than this share of the image counts as "nothing drawn" (the smallest shape
# the dataset draws, a 26-pixel star, covers ~6%).
MIN_SHAPE_FRACTION = 0.01
# Ideal values: star solidity ~0.58, other shapes 1.0; extent square 1.0, circle 0.785,
# triangle 0.5, so the boundaries sit halfway between neighbours.
STAR_MAX_SOLIDITY = 0.8
# A ring's hole is RING_INNER_RATIO^2 = 25% of its disc, a filled shape's 0.
RING_MIN_HOLES = 0.125
SQUARE_MIN_EXTENT = 0.89
CIRCLE_MIN_EXTENT = 0.64

_PALETTE_RGB = np.array([PALETTE[name] for name in COLOURS], dtype=np.float32)  # (K, 3)


@dataclass(frozen=True)
class ShapeReading:
    """What the analysis sees in one image."""

    background: str
    colour: str  # NO_SHAPE when no non-background colour covers MIN_SHAPE_FRACTION
    shape: str  # NO_SHAPE likewise
    solidity: float
    extent: float
    area: int  # pixels in the shape's region
    holes: float = 0.0  # enclosed non-shape pixels / (area + those pixels)


def palette_labels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Index into `COLOURS` of the nearest palette colour per pixel, shape (H, W)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    pixels = pixels.astype(np.float32)  # (H, W, 3)
    distances = ((pixels[:, :, None, :] - _PALETTE_RGB[None, None]) ** 2).sum(-1)  # (H, W, K)
    return distances.argmin(-1)


def read_shape(image: Image.Image | np.ndarray) -> ShapeReading:
    """Segment `image` and classify its shape."""
    labels = palette_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())

    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    counts[background] = 0
    colour = int(counts.argmax())
    if counts[colour] < MIN_SHAPE_FRACTION * labels.size:
        return ShapeReading(COLOURS[background], NO_SHAPE, NO_SHAPE, 0.0, 0.0, 0)

    region = largest_component(labels == colour)
    area = int(region.sum())
    ys, xs = np.nonzero(region)
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    extent = area / float(box_area)
    hull_area = max(convex_hull_area(region), 1.0)
    solidity = area / hull_area
    enclosed = enclosed_area(region)
    filled = area + enclosed
    holes = enclosed / float(filled)
    shape = classify_shape(solidity, extent)
    # A ring is a holed region that reads as a circle once its hole is filled in; a base
    # model's blotchy star or square with a gap stays what its outline says.
    filled_shape = classify_shape(filled / hull_area, filled / box_area)
    if holes >= RING_MIN_HOLES and filled_shape == "circle":
        shape = "ring"
    return ShapeReading(
        COLOURS[background], COLOURS[colour], shape, solidity, extent, area, holes,
    )


def classify_shape(solidity: float, extent: float) -> str:
    if solidity < STAR_MAX_SOLIDITY:
        return "star"
    if extent >= SQUARE_MIN_EXTENT:
        return "square"
    if extent >= CIRCLE_MIN_EXTENT:
        return "circle"
    return "triangle"


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask (breadth-first flood fill;
    a 64x64 image is small enough that plain Python is a few milliseconds)."""
    height, width = mask.shape
    component = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if component[y0, x0]:
            continue
        label += 1
        component[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not component[ny, nx]:
                    component[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return component == best_label


def enclosed_area(region: np.ndarray) -> int:
    """Pixels outside `region` that it encloses: those not 4-connected to the image border
    through non-region pixels."""
    outside = ~region
    reached = np.zeros(region.shape, dtype=bool)
    height, width = region.shape
    queue = deque((y, x) for y, x in zip(*np.nonzero(outside), strict=True)
                  if y in (0, height - 1) or x in (0, width - 1))
    for y, x in queue:
        reached[y, x] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < height and 0 <= nx < width and outside[ny, nx] and not reached[ny, nx]:
                reached[ny, nx] = True
                queue.append((ny, nx))
    return int((outside & ~reached).sum())


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixels, taken as unit squares (so a filled
    axis-aligned rectangle's hull area equals its pixel count)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate(
        [np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]
    )
    hull = _monotone_chain(np.unique(corners, axis=0))
    x, y = hull[:, 0].astype(np.float64), hull[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _monotone_chain(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices (Andrew's monotone chain) of integer points sorted by (x, y)."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    pts = [tuple(p) for p in points[order].tolist()]
    if len(pts) < 3:
        return np.array(pts)

    def cross(o: tuple, a: tuple, b: tuple) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])
