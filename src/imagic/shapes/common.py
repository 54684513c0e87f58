"""Tools both ShapesWorlds share: mask operations, pebble finding and background drawing.

ShapesWorld (:mod:`imagic.shapes`, 32 px) and ShapesWorld 2 (:mod:`imagic.shapes2`, 128 px)
build their backgrounds and read their pebbles the same way and differ only in scale, so the
logic lives here once and each world passes its own constants (thresholds, colour ranges,
image size).  Each world's modules keep their public names as thin wrappers, so callers and
results stay the same.  Nothing here knows about either world's scenes.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

# --------------------------------------------------------------------------- images and masks


def checked_image(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` as an array, after checking it is a (size, size, 3) RGB image.

    The detectors index and fit over the world's pixel grid, so another shape would give wrong
    readings rather than an error.
    """
    image = np.asarray(image)
    if image.shape != (size, size, 3):
        raise ValueError(f"expected a ({size}, {size}, 3) image, got {image.shape}")
    return image


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (0 = background, 1..n) of a boolean mask.

    Run-length union-find: each row's runs join the overlapping runs of the row above, so the
    Python loop runs over runs (a few hundred), not pixels.  Labels are numbered in raster order
    of each component's first pixel, as a plain breadth-first search would number them; any
    non-zero value counts as set.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = np.asarray(mask, dtype=bool)
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # exclusive; same row order as the starts
    parent = list(range(len(starts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = 0  # runs of the previous row: indices [prev_lo, prev_hi)
    i = 0
    n_runs = len(starts)
    while i < n_runs:
        row = rows_s[i]
        j = i
        while j < n_runs and rows_s[j] == row:
            j += 1
        if prev_hi > prev_lo and rows_s[prev_lo] == row - 1:
            k = prev_lo
            for r in range(i, j):
                # 8-connectivity: runs touch if they overlap after widening by one pixel.
                while k < prev_hi and ends[k] < starts[r]:
                    k += 1
                m = k
                while m < prev_hi and starts[m] <= ends[r]:
                    a, b = root(r), root(m)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                    m += 1
        prev_lo, prev_hi = i, j
        i = j
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for r in range(n_runs):
        label = ids.setdefault(root(r), len(ids) + 1)
        labels[rows_s[r], starts[r] : ends[r]] = label
    return labels, len(ids)


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation with numpy shifts (rows, then columns: the 3x3 box is separable)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    rows = out.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion.  Pixels outside the image do not count, so a mask that reaches the
    border keeps its border pixels: an object cut by the image edge is not thinned there."""
    return ~dilate(~mask)


def luminance(image: np.ndarray) -> np.ndarray:
    """Per-pixel luma (ITU-R BT.601 weights, 0..255) of an RGB image, float64."""
    rgb = image.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# --------------------------------------------------------------------------- pebbles


def find_pebbles(
    image: np.ndarray,
    exclude: np.ndarray | None = None,
    *,
    dark_ratio: float,
    depth: float,
    mass: float,
) -> list[tuple[float, float]]:
    """Centres (x, y) in pixels of the dark pebbles in an (H, W, 3) uint8 RGB image.

    The background is a gradient (plus faint texture and noise), so its luminance is fitted by
    a plane (least squares, refitted once without the pixels far below it).  A pebble is a
    component of pixels darker than ``dark_ratio`` of the plane whose darkest pixel is at least
    ``depth`` below it and whose summed darkness (1 - luminance / plane) is at least ``mass``:
    that separates a pebble from noise specks and texture dips, whose sizes differ per world.
    ``exclude`` masks pixels to ignore (the objects with a margin for their soft edges: a dark
    object or marking is no pebble).
    """
    luma = luminance(np.asarray(image))
    h, w = luma.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    design = np.stack([np.ones_like(xs), xs, ys], axis=-1)
    use = np.ones(luma.shape, bool) if exclude is None else ~exclude
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(design[use], luma[use], rcond=None)
        plane = np.maximum(design @ coef, 1.0)
        use &= luma > dark_ratio * plane
    darkness = np.clip(1.0 - luma / plane, 0.0, None)  # 0 on the background plane
    dark = luma < dark_ratio * plane
    if exclude is not None:
        dark &= ~exclude
    labels, n = label_components(dark)
    found = []
    for i in range(1, n + 1):
        weight = np.where(labels == i, darkness, 0.0)
        if weight.max() >= depth and weight.sum() >= mass:
            # darkness-weighted centre, in the world's pixel coordinates (pixel i spans i..i+1)
            found.append((float((weight * xs).sum() / weight.sum()) + 0.5,
                          float((weight * ys).sum() / weight.sum()) + 0.5))
    return found


def match_pebbles(
    expected: list[tuple[float, float]], found: list[tuple[float, float]], *, match_px: float
) -> tuple[int, int]:
    """(how many of ``expected`` have a found pebble within ``match_px``, how many found
    pebbles match none of ``expected``): greedy nearest pairs, each used once, so one found
    pebble cannot account for two expected ones."""
    pairs = sorted(
        (math.hypot(ex - fx, ey - fy), i, j)
        for i, (ex, ey) in enumerate(expected)
        for j, (fx, fy) in enumerate(found)
    )
    used_e, used_f = set(), set()
    for dist, i, j in pairs:
        if dist <= match_px and i not in used_e and j not in used_f:
            used_e.add(i)
            used_f.add(j)
    return len(used_e), len(found) - len(used_f)


# --------------------------------------------------------------------------- backgrounds
# Scenes are sampled from seeded generators, so these helpers draw their random numbers in a
# fixed order: changing it would change every scene of every seed.


def as_rng(rng_or_seed: np.random.Generator | int | None) -> np.random.Generator:
    """A generator passed through, or a new one from a seed (None: fresh entropy)."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def sample_background_colour(
    rng: np.random.Generator,
    saturation: tuple[float, float],
    value: tuple[float, float],
) -> tuple[float, float, float]:
    """A random background colour, RGB in [0, 1]: any hue, HSV saturation and value drawn
    from the world's ranges (kept low enough that the background never reads as an object)."""
    h, s, v = rng.uniform(0.0, 1.0), rng.uniform(*saturation), rng.uniform(*value)
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def sample_pebble_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random pebble colour, dark grey to dark brown, RGB in [0, 1]: darker than any
    background, which is what lets :func:`find_pebbles` see it."""
    return tuple(  # type: ignore[return-value]
        float(c)
        for c in colorsys.hsv_to_rgb(
            rng.uniform(0.05, 0.1), rng.uniform(0.0, 0.4), rng.uniform(0.12, 0.22)
        )
    )


def gradient(size: int, angle: float) -> np.ndarray:
    """Where each pixel lies along a linear gradient at ``angle`` degrees, float32 (size, size)
    in [0, 1] over the image: the weight of a background's second colour."""
    theta = math.radians(angle)
    c, s = math.cos(theta), math.sin(theta)
    coords = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    proj = coords[None, :] * c + coords[:, None] * s
    return 0.5 + proj / (size * (abs(c) + abs(s)))
