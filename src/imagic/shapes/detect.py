"""Analytic detectors that read ShapesWorld attributes back from any 32x32 RGB image.

They are used to score generated and edited images, so they must work on noisy, slightly blurred
samples and not only on exact renders.  Everything rests on one property of the world: the
object is saturated and bright, the background (gradient, noise, pebbles) never is.

Pipeline:
1. chroma (max - min of RGB) above a fixed threshold marks object pixels;
2. 8-connected components; components smaller than MIN_AREA pixels are noise;
3. none left -> "no object", several -> "several objects", one -> measure it:
   * colour: chroma-weighted circular mean hue -> nearest canonical hue;
   * shape: rotation-invariant complex moments of the soft coverage (a triangle has a 3-fold
     harmonic, a square a 4-fold one, a circle neither);
   * size: area -> equivalent nominal radius for that shape, thresholded between the size ranges;
   * position: centroid -> 3x3 grid cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import common
from .common import checked_image, dilate, label_components
from .world import (
    ATTRIBUTES,
    CELL,
    COLOUR_HUES,
    IMAGE_SIZE,
    POSITIONS,
    SHAPE_AREA_FACTOR,
    SIZE_RADII,
    Scene,
)

# Background chroma is at most ~0.28 * 0.6 * 255 = 43, an object's at least ~0.8 * 0.85 * 255
# = 173; the threshold sits in between so a pixel counts once it is roughly half covered.
CHROMA_THRESHOLD = 100.0
# The smallest object (a small triangle) covers ~40 px; noise specks are a few pixels.
MIN_AREA = 12
# Size boundary on the equivalent nominal radius: between small's max and large's min.
SIZE_THRESHOLD = math.sqrt(SIZE_RADII["small"][1] * SIZE_RADII["large"][0])


@dataclass
class Detection:
    """What the detector read from an image.

    Attributes are None unless exactly one object was found (``status == "ok"``).  ``count`` is
    the number of separate objects found (0, 1, or >= 2).  ``mask`` holds the pixels of every
    object found (all False if there is none).  ``features`` holds the raw
    measurements (area, centroid, hue, moments) for debugging and finer scoring.
    """

    shape: str | None
    colour: str | None
    size: str | None
    position: str | None
    mask: np.ndarray
    count: int
    status: str
    features: dict[str, float] = field(default_factory=dict)

    @property
    def attributes(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def _chroma_hue(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel chroma (0..255) and hue (degrees) of an RGB image."""
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = hi - lo
    # Hexagonal hue via atan2 of the opponent axes: smooth, no case analysis.
    hue = np.degrees(np.arctan2(math.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0
    return chroma, hue


def _shape_features(weights: np.ndarray) -> dict[str, float]:
    """Centroid, area and normalised 3rd/4th complex moments of a soft coverage map."""
    ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    area = float(weights.sum())
    cx = float((weights * (xs + 0.5)).sum() / area)
    cy = float((weights * (ys + 0.5)).sum() / area)
    z = (xs + 0.5 - cx) + 1j * (ys + 0.5 - cy)
    rho = np.abs(z)
    feats = {"area": area, "cx": cx, "cy": cy}
    for n in (3, 4):
        feats[f"m{n}"] = float(abs((weights * z**n).sum()) / max((weights * rho**n).sum(), 1e-9))
    feats["fill"] = area / (math.pi * float(rho[weights > 0.5].max(initial=0.5)) ** 2)
    return feats


def _classify_shape(m3: float, m4: float) -> str:
    """Triangle / square / circle from the 3- and 4-fold moment strengths.

    On renders a triangle's m3 is ~0.63 and a square's m4 ~0.42 (others stay below ~0.15 even
    with noise), so each is compared to half its ideal value; a circle has neither.
    """
    tri, sq = m3 / 0.63, m4 / 0.42
    if max(tri, sq) < 0.5:
        return "circle"
    return "triangle" if tri >= sq else "square"


def _nearest_colour(hue: float) -> str:
    def gap(name: str) -> float:
        d = abs(hue - COLOUR_HUES[name]) % 360.0
        return min(d, 360.0 - d)

    return min(COLOUR_HUES, key=gap)


def _cell(cx: float, cy: float) -> str:
    col = min(max(int(cx // CELL), 0), 2)
    row = min(max(int(cy // CELL), 0), 2)
    return POSITIONS[3 * row + col]


def detect(image: np.ndarray) -> Detection:
    """Find the object(s) in a (32, 32, 3) uint8 RGB image and read their attributes."""
    image = checked_image(image, IMAGE_SIZE)
    chroma, hue = _chroma_hue(image)
    labels, n = label_components(chroma > CHROMA_THRESHOLD)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if areas[i] >= MIN_AREA]
    mask = np.isin(labels, keep)
    if not keep:
        return Detection(None, None, None, None, mask, 0, "no object")
    if len(keep) > 1:
        return Detection(None, None, None, None, mask, len(keep), "several objects")

    # Soft coverage: rescale chroma between the local background level and the object's
    # interior level, so area and moments are sub-pixel accurate even for small shapes.
    region = dilate(dilate(mask))
    inner = float(np.percentile(chroma[mask], 75))
    outer = float(np.median(chroma[~region])) if (~region).any() else 0.0
    weights = np.clip((chroma - outer) / max(inner - outer, 1.0), 0.0, 1.0) * region
    feats = _shape_features(weights)

    w = chroma[mask]
    angles = np.radians(hue[mask])
    mean_hue = math.degrees(math.atan2((w * np.sin(angles)).sum(), (w * np.cos(angles)).sum()))
    feats["hue"] = mean_hue % 360.0

    shape = _classify_shape(feats["m3"], feats["m4"])
    feats["radius"] = math.sqrt(feats["area"] / SHAPE_AREA_FACTOR[shape])
    return Detection(
        shape=shape,
        colour=_nearest_colour(feats["hue"]),
        size="large" if feats["radius"] > SIZE_THRESHOLD else "small",
        position=_cell(feats["cx"], feats["cy"]),
        mask=mask,
        count=1,
        status="ok",
        features=feats,
    )


def attributes_of(scene: Scene | dict[str, Any]) -> dict[str, Any]:
    """The four attributes of a scene (or of an attribute dict, passed through)."""
    if isinstance(scene, Scene):
        return scene.attributes
    return {a: scene.get(a) for a in ATTRIBUTES}


def compare(detection: Detection, expected: Scene | dict[str, Any]) -> dict[str, bool]:
    """Per-attribute correctness of a detection; attributes absent from ``expected`` are skipped.

    A detection that is not "ok" gets every attribute wrong.
    """
    target = attributes_of(expected)
    return {
        a: detection.status == "ok" and getattr(detection, a) == target[a]
        for a in ATTRIBUTES
        if target.get(a) is not None
    }


# --------------------------------------------------------------------------- pebbles

# A pebble is dark: value 0.12-0.22 on a background of value 0.3-0.6 (world.py), so its pixels
# are at most ~73% as bright as the background there, typically ~40%; the noise moves a pixel by
# at most ~6%.  A pixel is "dark" below DARK_RATIO of the background plane's luminance; a pebble
# is a dark component whose darkest pixel is at least PEBBLE_DEPTH below the plane and whose
# summed darkness is at least PEBBLE_MASS (a pebble covers 3-7 px, a noise speck one).
DARK_RATIO = 0.85
PEBBLE_DEPTH = 0.2
PEBBLE_MASS = 0.5
# An output keeps a pebble when it has one within this distance (px) of the input's.
PEBBLE_MATCH_PX = 1.5


def find_pebbles(image: np.ndarray, exclude: np.ndarray | None = None) -> list[tuple[float, float]]:
    """Centres (x, y) in pixels of the dark pebbles in a (32, 32, 3) uint8 RGB image.

    :func:`imagic.shapes.common.find_pebbles` with this world's thresholds.  ``exclude`` masks
    pixels to ignore (the objects, with a margin for their soft edges, e.g.
    ``dilate(object_mask(scene))``: a dark purple or blue shape is no pebble).
    """
    image = checked_image(image, IMAGE_SIZE)
    return common.find_pebbles(
        image, exclude, dark_ratio=DARK_RATIO, depth=PEBBLE_DEPTH, mass=PEBBLE_MASS
    )


def match_pebbles(
    expected: list[tuple[float, float]], found: list[tuple[float, float]]
) -> tuple[int, int]:
    """(how many of ``expected`` have a found pebble within PEBBLE_MATCH_PX, how many found
    pebbles match none of ``expected``): greedy nearest pairs, each used once."""
    return common.match_pebbles(expected, found, match_px=PEBBLE_MATCH_PX)
