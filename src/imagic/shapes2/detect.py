"""Analytic detectors for ShapesWorld 2: read every object of any 128x128 RGB image.

No learned model.  Everything rests on one property of the world: objects (and their markings)
are saturated, the background (gradient, texture, noise, pebbles) never is.

Pipeline:
1. chroma (max - min of RGB) above CHROMA_THRESHOLD marks object pixels;
2. 8-connected components of at least MIN_AREA pixels; a small fragment joins the largest
   component of its slot, every other component is an object, read left to right:
   * kind: a cat is far from convex (legs, tail, ears) and has both a 3- and a 4-fold
     moment; a rigid shape is convex and lacks one: a triangle has a strong 3-fold moment, a
     square a 4-fold one, a circle neither;
   * pose (cats): the box's width / height -- sitting is tall, standing square, lying flat;
   * size: area divided by the nominal area of that kind and pose -> scale, thresholded;
   * position: the slot of the box's centre;
   * colour: the HSV hue of the mean body colour (markings excluded) -> nearest named hue;
3. identity (never captioned): the exact colour (hue offset from the named hue, saturation,
   brightness), the markings' relative shade, their type (elongated stripes or round spots)
   and count.  :func:`identity_distance` compares two readings; below IDENTITY_THRESHOLD they
   are the same object.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..shapes import common
from ..shapes.common import checked_image, dilate, erode, label_components
from .world import (
    ATTRIBUTES,
    COLOUR_HUES,
    IMAGE_SIZE,
    POSED_KINDS,
    POSES,
    POSITIONS,
    SIZE_SCALES,
    SLOT_WIDTH,
    Scene,
    nominal_area,
    render,
)

# Background chroma is at most ~0.15 * 0.62 * 255 = 24 (+ noise), an object's at least
# ~0.75 * 0.8 * 255 = 153 and a marking's 0.45 of that (69); the threshold sits between.
CHROMA_THRESHOLD = 45.0
# The smallest object (a small triangle) covers ~160 px; a fragment below this is ignored.
MIN_AREA = 30
# A component below this share of its slot's largest is a fragment of that object.
FRAGMENT_SHARE = 0.2
# Kind: a rigid shape is convex and lacks its 3-fold (circle, square) or 4-fold (triangle)
# moment; a cat is neither.  Each feature gives a margin from its boundary in units of its
# spread, and their sum decides, so a clear reading of one outweighs a borderline other.
# Solidity: cats <= ~0.91 (a small sitting cat is the most compact), rigid shapes >= ~0.93.
# min(m3, m4): cats >= ~0.15, rigid shapes <= ~0.09.
SOLIDITY_BOUNDARY, SOLIDITY_SPREAD = 0.92, 0.02
HARMONIC_BOUNDARY, HARMONIC_SPREAD = 0.12, 0.03
# Box width / height: sitting ~0.65, standing ~1.0, lying ~1.9.
POSE_ASPECTS = (0.82, 1.4)
# Scale boundary between small (<= 0.70) and large (>= 0.90).
SIZE_THRESHOLD = math.sqrt(SIZE_SCALES["small"][1] * SIZE_SCALES["large"][0])
# A marking pixel is darker than this share of the body's brightness (markings: <= 0.65).
MARK_RATIO = 0.82
MARK_SATURATION_DROP = 0.1  # a marking pixel keeps (nearly) the body's HSV saturation
MARK_MIN_AREA = 3  # px; smaller dark specks are anti-aliasing in concave corners
STRIPE_ELONGATION = 1.8  # a stripe is at least ~3x longer than wide, a spot round

# Identity: how far each measured detail may differ for the same object.  The distance is the
# root sum of squares of the differences over these tolerances, plus one per marking-type or
# count mismatch.  On renders the same object stays far below 1 (re-posed or moved); the
# tolerances leave room for mild blur, which lightens thin markings and the body's rim.
IDENTITY_TOLERANCES: dict[str, float] = {
    "hue_offset": 2.0,  # degrees
    "saturation": 0.04,
    "value": 0.05,
    "shade": 0.1,
}
IDENTITY_THRESHOLD = 1.0


@dataclass(frozen=True)
class Identity:
    """The unnamed details read from one object: what "kept its identity" compares.

    hue_offset: degrees from the named colour's canonical hue (kept by a colour edit too).
    saturation, value: HSV of the mean body colour.
    shade: the markings' brightness relative to the body's (0 when there are none).
    marking: "stripes", "spots", or None when no marking was found.
    marks: how many stripes or spots.
    """

    hue_offset: float
    saturation: float
    value: float
    shade: float
    marking: str | None
    marks: int


@dataclass
class ThingDetection:
    """One object found in an image: its named attributes, mask, identity and raw features."""

    kind: str
    pose: str | None
    colour: str
    size: str
    position: str
    mask: np.ndarray
    identity: Identity
    features: dict[str, float] = field(default_factory=dict)

    @property
    def attributes(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


@dataclass
class SceneDetection:
    """Every object found, left to right; ``mask`` is their union."""

    things: list[ThingDetection]
    mask: np.ndarray

    @property
    def count(self) -> int:
        return len(self.things)

    @property
    def positions(self) -> list[str]:
        return [t.position for t in self.things]

    def at(self, position: str) -> ThingDetection | None:
        """The object read in a slot (the largest if several), or None."""
        found = [t for t in self.things if t.position == position]
        return max(found, key=lambda t: t.features["area"]) if found else None


# --------------------------------------------------------------------------- image helpers


def _max_min(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the RGB channels (channel-wise ufuncs: faster than axis=-1)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _chroma(image: np.ndarray) -> np.ndarray:
    """Per-pixel chroma (max - min of RGB, 0..255) of a uint8 RGB image."""
    hi, lo = _max_min(image)
    return hi - lo


def _sat_value(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel HSV saturation and value (0..1) of an RGB image."""
    hi, lo = (c.astype(np.float32) for c in _max_min(image))
    return (hi - lo) / np.maximum(hi, 1.0), hi / 255.0


def _quantile(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile (lower) of a 1-d array, without np.percentile's overhead."""
    k = int(q * (values.size - 1))
    return float(np.partition(values, k)[k])


def _convex_hull(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Convex hull of points sorted by (y, x), in order (Andrew's monotone chain)."""

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while len(out) >= 2 and (
                (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
            ) <= 0:
                out.pop()
            out.append(p)
        return out

    if len(points) <= 2:
        return points
    return half(points)[:-1] + half(points[::-1])[:-1]


def _solidity(mask: np.ndarray) -> float:
    """Mask pixels / pixel centres inside the convex hull of the mask's pixel centres.

    The hull's vertices are pixel centres, so Pick's theorem counts the centres it holds
    exactly: area + boundary points / 2 + 1.
    """
    rows = np.nonzero(mask.any(axis=1))[0]
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    # Only each row's leftmost and rightmost pixels can be hull vertices; (y, x) order.
    points = [(int(x), int(y)) for y, a, b in zip(rows, left, right) for x in {a, b}]
    points.sort(key=lambda p: (p[1], p[0]))
    hull = np.array(_convex_hull(points), dtype=np.int64)
    if len(hull) < 3:
        return 1.0
    nxt = np.roll(hull, -1, axis=0)
    area = abs(float((hull[:, 0] * nxt[:, 1] - nxt[:, 0] * hull[:, 1]).sum())) / 2
    boundary = float(np.gcd(np.abs(nxt[:, 0] - hull[:, 0]), np.abs(nxt[:, 1] - hull[:, 1])).sum())
    return float(mask.sum()) / (area + boundary / 2 + 1)


def _moments(mask: np.ndarray) -> tuple[float, float]:
    """Normalised strength of the 3- and 4-fold complex moments of a mask about its centroid."""
    ys, xs = np.nonzero(mask)
    z = (xs - xs.mean()) + 1j * (ys - ys.mean())
    rho = np.abs(z)
    return tuple(float(abs((z**n).sum()) / max((rho**n).sum(), 1e-9)) for n in (3, 4))


def _classify_rigid(m3: float, m4: float) -> str:
    """Triangle / square / circle: a triangle's m3 is ~0.6, a square's m4 ~0.4, others ~0."""
    tri, sq = m3 / 0.6, m4 / 0.4
    if max(tri, sq) < 0.5:
        return "circle"
    return "triangle" if tri >= sq else "square"


def _hue_gap(a: float, b: float) -> float:
    d = (a - b) % 360.0
    return d - 360.0 if d > 180.0 else d


def _nearest_colour(hue: float) -> str:
    return min(COLOUR_HUES, key=lambda name: abs(_hue_gap(hue, COLOUR_HUES[name])))


def _elongations(labels: np.ndarray, ids: list[int]) -> list[float]:
    """Per component: sqrt of the ratio of its principal second moments (1 for a disc)."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    size = labels.max() + 1

    def total(weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(lab, weights=weights, minlength=size)

    n, sx, sy = total(), total(xs), total(ys)
    sxx, syy, sxy = total(xs * xs), total(ys * ys), total(xs * ys)
    out = []
    for i in ids:
        mx, my = sx[i] / n[i], sy[i] / n[i]
        vxx = sxx[i] / n[i] - mx * mx + 1 / 12  # + 1/12: a pixel's own spread
        vyy = syy[i] / n[i] - my * my + 1 / 12
        vxy = sxy[i] / n[i] - mx * my
        mid, half = (vxx + vyy) / 2, math.hypot((vxx - vyy) / 2, vxy)
        out.append(math.sqrt((mid + half) / max(mid - half, 1e-9)))
    return out


# --------------------------------------------------------------------------- reading objects


def _read_identity(
    image: np.ndarray, sat: np.ndarray, value: np.ndarray, mask: np.ndarray, core: np.ndarray
) -> tuple[str, Identity, dict[str, float]]:
    """(colour name, identity, features) of one object from its pixels.

    The body colour comes from the fully covered pixels (``core``) at the top of the
    brightness range, so neither markings nor the background showing through shift it.
    """
    ref = _quantile(value[core], 0.9)
    body = core & (value >= 0.95 * ref)
    r, g, b = (image[body].astype(np.float64).mean(axis=0) / 255.0).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    hue = h * 360.0
    colour = _nearest_colour(hue)
    # A marking keeps the body's hue and saturation and is darker; a pixel darkened by the
    # background showing through (between two legs, say) is also less saturated.
    marks = mask & (value < MARK_RATIO * v) & (sat >= s - MARK_SATURATION_DROP)
    labels, n = label_components(marks)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    kept = [i for i in range(1, n + 1) if sizes[i] >= MARK_MIN_AREA]
    marking, shade, elongations = None, 0.0, []
    if kept:
        elongations = _elongations(labels, kept)
        found = np.isin(labels, kept) if len(kept) < n else labels > 0
        shade = _quantile(value[found], 0.1) / max(v, 1e-6)
        marking = "stripes" if float(np.median(elongations)) >= STRIPE_ELONGATION else "spots"
    identity = Identity(
        hue_offset=_hue_gap(hue, COLOUR_HUES[colour]),
        saturation=s,
        value=v,
        shade=shade,
        marking=marking,
        marks=len(kept),
    )
    feats = {
        "hue": hue,
        "body_chroma": (max(r, g, b) - min(r, g, b)) * 255.0,
        "elongation": float(np.median(elongations)) if elongations else 0.0,
    }
    return colour, identity, feats


def _soft_area(chroma: np.ndarray, mask: np.ndarray, core: np.ndarray, body_chroma: float) -> float:
    """Sub-pixel area: fully covered core pixels count 1, rim pixels by their chroma between
    the surrounding background's and the body's."""
    ring = dilate(mask)
    outside = dilate(ring) & ~ring
    bg = float(np.median(chroma[outside])) if outside.any() else 0.0
    cover = np.clip((chroma - bg) / max(body_chroma - bg, 1.0), 0.0, 1.0)
    return float(core.sum() + cover[ring & ~core].sum())


def _read_thing(image: np.ndarray, chroma: np.ndarray, mask: np.ndarray) -> ThingDetection:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    # Work inside the object's box (plus a margin) for speed.
    y_lo, y_hi = max(0, y0 - 3), min(IMAGE_SIZE, y1 + 4)
    x_lo, x_hi = max(0, x0 - 3), min(IMAGE_SIZE, x1 + 4)
    box = (slice(y_lo, y_hi), slice(x_lo, x_hi))
    local = mask[box]
    core = erode(local)
    if core.sum() < 4:  # a sliver: fall back on the whole mask
        core = local
    sat, value = _sat_value(image[box])
    colour, identity, extra = _read_identity(image[box], sat, value, local, core)
    area = _soft_area(chroma[box], local, core, extra["body_chroma"])
    width, height = x1 - x0 + 1, y1 - y0 + 1
    aspect = width / height
    solidity = _solidity(local)
    m3, m4 = _moments(local)
    rigidity = (solidity - SOLIDITY_BOUNDARY) / SOLIDITY_SPREAD + (
        HARMONIC_BOUNDARY - min(m3, m4)) / HARMONIC_SPREAD
    if rigidity < 0:
        kind = "cat"
        pose = POSES[1] if aspect < POSE_ASPECTS[0] else POSES[0]
        if aspect >= POSE_ASPECTS[1]:
            pose = POSES[2]
    else:
        kind, pose = _classify_rigid(m3, m4), None
    scale = math.sqrt(area / nominal_area(kind, pose))
    centre = (x0 + x1 + 1) / 2
    position = POSITIONS[min(max(int(centre // SLOT_WIDTH), 0), len(POSITIONS) - 1)]
    feats = {
        "area": area, "x0": x0, "x1": x1 + 1, "y0": y0, "y1": y1 + 1, "aspect": aspect,
        "solidity": solidity, "m3": m3, "m4": m4, "rigidity": rigidity, "scale": scale,
        "centre_x": centre, **extra,
    }  # fmt: skip
    return ThingDetection(
        kind=kind,
        pose=pose,
        colour=colour,
        size="large" if scale > SIZE_THRESHOLD else "small",
        position=position,
        mask=mask,
        identity=identity,
        features=feats,
    )


def detect(image: np.ndarray) -> SceneDetection:
    """Find every object in a (128, 128, 3) uint8 RGB image and read it."""
    image = checked_image(image, IMAGE_SIZE)
    chroma = _chroma(image)
    labels, n = label_components(chroma > CHROMA_THRESHOLD)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    comps = [i for i in range(1, n + 1) if areas[i] >= MIN_AREA]
    # Group fragments with the largest component of their slot (by the component's centroid).
    slot_of = {}
    for i in comps:
        xs = np.nonzero(labels == i)[1]
        slot_of[i] = min(int(xs.mean() // SLOT_WIDTH), len(POSITIONS) - 1)
    groups: dict[int, list[int]] = {}
    for i in sorted(comps, key=lambda c: -areas[c]):
        biggest = next((g for g in groups if slot_of[g] == slot_of[i]), None)
        if biggest is not None and areas[i] < FRAGMENT_SHARE * areas[biggest]:
            groups[biggest].append(i)
        else:
            groups[i] = [i]
    things = [_read_thing(image, chroma, np.isin(labels, members)) for members in groups.values()]
    things.sort(key=lambda t: t.features["centre_x"])
    union = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for t in things:
        union |= t.mask
    return SceneDetection(things=things, mask=union)


# --------------------------------------------------------------------------- scoring


def identity_parts(a: Identity | ThingDetection,
                   b: Identity | ThingDetection) -> tuple[float, float]:
    """The two parts of `identity_distance`: the root sum of squares of the colour and shade
    differences over their tolerances, and one for a different marking type plus one per
    stripe or spot more or fewer."""
    a = a.identity if isinstance(a, ThingDetection) else a
    b = b.identity if isinstance(b, ThingDetection) else b
    total = sum(
        ((getattr(a, name) - getattr(b, name)) / tol) ** 2
        for name, tol in IDENTITY_TOLERANCES.items()
    )
    return math.sqrt(total), float(a.marking != b.marking) + abs(a.marks - b.marks)


def identity_distance(a: Identity | ThingDetection, b: Identity | ThingDetection) -> float:
    """How different two objects' unnamed details are; below IDENTITY_THRESHOLD: the same
    (the sum of `identity_parts`)."""
    return sum(identity_parts(a, b))


def same_identity(a: Identity | ThingDetection, b: Identity | ThingDetection) -> bool:
    """Whether two readings are of the same object (in any pose, place or colour)."""
    return identity_distance(a, b) < IDENTITY_THRESHOLD


_DETAIL_WORDS = {"hue_offset": "hue", "saturation": "saturation", "value": "brightness",
                 "shade": "marking shade"}


def identity_changes(a: Identity | ThingDetection, b: Identity | ThingDetection) -> list[str]:
    """What makes `b` a different object from `a`, in words, largest first: each detail that
    moved at least half its tolerance ("hue +3.1°") and a changed marking ("1 stripe → 2
    spots"); empty when they are the same object."""
    a = a.identity if isinstance(a, ThingDetection) else a
    b = b.identity if isinstance(b, ThingDetection) else b
    if identity_distance(a, b) < IDENTITY_THRESHOLD:
        return []
    # four details each under half their tolerance stay under the threshold together
    moved = sorted(((getattr(b, name) - getattr(a, name), tol, name)
                    for name, tol in IDENTITY_TOLERANCES.items()),
                   key=lambda d: -abs(d[0]) / d[1])
    words = [_detail(name, delta) for delta, tol, name in moved if abs(delta) >= tol / 2]
    if (a.marking, a.marks) != (b.marking, b.marks):
        words.insert(0, f"{_marks(a)} → {_marks(b)}")
    return words


def _detail(name: str, delta: float) -> str:
    return f"hue {delta:+.1f}°" if name == "hue_offset" else f"{_DETAIL_WORDS[name]} {delta:+.2f}"


def _marks(identity: Identity) -> str:
    if identity.marking is None or identity.marks == 0:
        return "no marking"
    noun = {"stripes": "stripe", "spots": "spot"}[identity.marking]
    return f"{identity.marks} {noun}{'s' if identity.marks != 1 else ''}"


def _checked(attrs: dict[str, Any]) -> list[str]:
    """The attributes an expected object names: those not None, and the pose of a rigid kind
    (which must read as no pose)."""
    rigid = attrs.get("kind") is not None and attrs["kind"] not in POSED_KINDS
    return [a for a in ATTRIBUTES if attrs.get(a) is not None or (a == "pose" and rigid)]


def compare(detection: SceneDetection, expected: Scene | list[dict[str, Any]]) -> dict[str, Any]:
    """Per-object, per-attribute correctness of a detection against a scene.

    Expected objects are matched by position.  Returns ``count`` (the right number of objects),
    ``things``: one dict per expected object (left to right) of attribute -> right (attributes
    an expected dict leaves out or sets to None are skipped, except a rigid kind's pose; an
    object not found gets every attribute wrong), and ``all``: the count and every attribute of
    every object right.
    """
    wanted = expected.attributes if isinstance(expected, Scene) else list(expected)
    per_thing = []
    for attrs in wanted:
        found = detection.at(attrs["position"]) if attrs.get("position") else None
        per_thing.append({
            a: found is not None and found.attributes[a] == attrs.get(a) for a in _checked(attrs)
        })
    count = detection.count == len(wanted)
    return {
        "count": count,
        "things": per_thing,
        "all": count and all(all(t.values()) for t in per_thing),
    }


def identity_of(scene: Scene, position: str) -> Identity:
    """The identity read from the clean render of ``scene``'s object at ``position``."""
    found = detect(render(scene)).at(position)
    if found is None:  # pragma: no cover - every object of a render is found
        raise LookupError(f"no object read on the {position}")
    return found.identity


# --------------------------------------------------------------------------- pebbles

# A pebble is dark: value 0.12-0.22 on a background of value >= 0.42, so its pixels are at most
# ~55% as bright as the background there; texture and noise move a pixel by ~8% at most.  A pixel
# is "dark" below DARK_RATIO of the background plane's luminance; a pebble is a dark component
# whose darkest pixel is at least PEBBLE_DEPTH below the plane and whose summed darkness is at
# least PEBBLE_MASS (a pebble covers 10-28 px, texture dips none).
DARK_RATIO = 0.82
PEBBLE_DEPTH = 0.3
PEBBLE_MASS = 2.0
# An output keeps a pebble when it has one within this distance (px) of the input's.
PEBBLE_MATCH_PX = 2.0


def find_pebbles(image: np.ndarray, exclude: np.ndarray | None = None) -> list[tuple[float, float]]:
    """Centres (x, y) in px of the dark pebbles in a (128, 128, 3) uint8 RGB image.

    :func:`imagic.shapes.common.find_pebbles` with this world's thresholds.  ``exclude`` masks
    pixels to ignore (the objects with a margin, e.g. ``dilate(detect(image).mask)``: a dark
    marking is no pebble).
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
