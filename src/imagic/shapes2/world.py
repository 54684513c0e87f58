"""ShapesWorld 2: procedural 128x128 RGB scenes of one to three objects, with a known truth.

A scene has three horizontal slots ("left", "middle", "right") and one to three objects, each in
its own slot, standing on a common ground line.  An object has five named attributes:

* kind: a posed creature ("cat") or a rigid shape ("circle", "square", "triangle");
* pose: for the cat only, "standing", "sitting" or "lying" -- its body, head, legs and tail move
  relative to each other, so a pose edit changes the outline but not the object;
* colour, size and position (its slot).

Each object also carries *identity* details that captions never name: an exact hue inside its
colour's band, its saturation and brightness, a marking (dark stripes or spots of its own hue,
with their own count, places and shade) and, for the cat, its proportions and facing.  Markings
live on the cat's body, which every pose only moves and turns, so they survive a pose change.

The background is also never named: a gradient between two muted colours, a low-contrast smooth
texture, fine per-pixel noise and a few small dark pebbles.  Objects are saturated, the
background never is, which is what keeps the analytic detectors in :mod:`.detect` exact.

Editing: :func:`edit_thing`, :func:`add_thing` and :func:`remove_thing` return the same scene
with one object's attribute changed, one object added in a free slot, or one removed.  Every
other object, the background, the noise and the pebbles stay bit-identical, because each object
stays inside its own slot and the pebbles stay outside the band where objects can stand.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np

from ..shapes.common import as_rng, gradient, sample_background_colour, sample_pebble_colour

IMAGE_SIZE = 128
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: smooth, cheap anti-aliasing

KINDS: tuple[str, ...] = ("cat", "circle", "square", "triangle")
POSED_KINDS: tuple[str, ...] = ("cat",)
POSES: tuple[str, ...] = ("standing", "sitting", "lying")
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
ATTRIBUTES: tuple[str, ...] = ("kind", "pose", "colour", "size", "position")
MARKINGS: tuple[str, ...] = ("stripes", "spots")  # identity details, never captioned

# Canonical HSV hues in degrees.  Neighbours are >= 55 degrees apart and an object's exact hue
# lies within +-HUE_JITTER of its colour's, so a nearest-hue rule keeps a wide margin.
COLOUR_HUES: dict[str, float] = {
    "red": 0.0,
    "yellow": 55.0,
    "green": 120.0,
    "blue": 220.0,
    "purple": 285.0,
}
HUE_JITTER = 10.0  # degrees
SATURATION_RANGE = (0.75, 1.0)
VALUE_RANGE = (0.8, 1.0)
SHADE_RANGE = (0.45, 0.65)  # a marking's brightness relative to its object's

# Scale factor of each size: the cat's nominal body is 24 px long and a circle's radius 14 px at
# scale 1.  The gap (0.70 -> 0.90) is a factor ~1.65 in area, enough to survive proportions.
SIZE_SCALES: dict[str, tuple[float, float]] = {"small": (0.64, 0.70), "large": (0.90, 1.0)}
RIGID_RADIUS = 14.0  # px at scale 1

SLOT_WIDTH = IMAGE_SIZE / len(POSITIONS)
SLOT_MARGIN = 1.5  # px kept free on either side of an object inside its slot
GROUND_RANGE = (86.0, 100.0)  # y of the ground line, per scene
DROP = 3.0  # an object's base lies within +-DROP px of the ground line
MAX_HEIGHT = 38.0  # no object is taller than this (checked by the tests)
RIGID_MAX_ANGLE = 12.0  # degrees
PEBBLE_GAP = 3.0  # px between a pebble and the band where objects can stand
# The background's HSV saturation and value ranges: muted mid greys, never mistaken for an
# object or a pebble.
BG_SATURATION = (0.03, 0.15)
BG_VALUE = (0.42, 0.62)

PREFIXES: tuple[str, ...] = ("", "a photo of ", "an image of ", "there is ", "a picture of ")


def _prefix_words() -> set[str]:
    return {w for p in PREFIXES for w in p.split()}


# Every word a caption can use; position phrases are "on the left", "in the middle", ...
VOCABULARY: list[str] = sorted(
    _prefix_words()
    | set(KINDS)
    | set(POSES)
    | set(COLOURS)
    | set(SIZES)
    | set(POSITIONS)
    | {"a", "and", "on", "in", "the"}
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Thing:
    """One object: five named attributes, identity details and placement jitter.

    Pixel geometry is derived from these fields, so replacing a named attribute (colour, pose,
    position, size) re-derives it while every identity detail stays bit-identical.

    Fields:
        kind, pose, colour, size, position: named attributes; ``pose`` is None for rigid kinds.
        scale_u: where the scale lies within its size's range, in [0, 1].
        jitter_x: horizontal offset inside the slot, in [-1, 1] of the free room.
        drop: vertical offset of the object's base from the ground line, px.
        angle: rotation of a rigid shape, degrees (the cat's pose sets its body angle).
        facing: +1 (a cat's head to the right) or -1: the object mirrored.
        hue_jitter, saturation, value: the exact HSV colour (hue relative to the colour's).
        shade: the marking's brightness relative to the object's.
        marking: "stripes" or "spots".
        marks: (x, y, r) per stripe or spot, in the marking frame's units (see ``_mark_frame``);
            a stripe has y = 0 and r = its half-width.
        proportions: cat only: body length, body aspect, head, leg and tail factors.
    """

    kind: str
    colour: str
    size: str
    position: str
    pose: str | None = None
    scale_u: float = 0.5
    jitter_x: float = 0.0
    drop: float = 0.0
    angle: float = 0.0
    facing: int = 1
    hue_jitter: float = 0.0
    saturation: float = 0.9
    value: float = 0.9
    shade: float = 0.55
    marking: str = "spots"
    marks: tuple[tuple[float, float, float], ...] = ()
    proportions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name, allowed in (
            ("kind", KINDS), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS),
            ("marking", MARKINGS),
        ):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} not in {allowed}")
        if self.kind in POSED_KINDS and self.pose not in POSES:
            raise ValueError(f"a {self.kind} needs a pose in {POSES}, got {self.pose!r}")
        if self.kind not in POSED_KINDS and self.pose is not None:
            raise ValueError(f"a {self.kind} has no pose, got {self.pose!r}")
        if self.facing not in (1, -1):
            raise ValueError(f"facing must be 1 or -1, got {self.facing!r}")

    def replace(self, **changes: Any) -> Thing:
        """Return a copy with ``changes`` applied; everything not named stays identical."""
        return dataclasses.replace(self, **changes)

    @property
    def attributes(self) -> dict[str, str | None]:
        """The five named attributes (what captions and detectors talk about)."""
        return {a: getattr(self, a) for a in ATTRIBUTES}

    @property
    def scale(self) -> float:
        lo, hi = SIZE_SCALES[self.size]
        return lo + (hi - lo) * self.scale_u

    @property
    def rgb(self) -> tuple[float, float, float]:
        """The object's colour, RGB in [0, 1]."""
        hue = (COLOUR_HUES[self.colour] + self.hue_jitter) % 360.0
        return colorsys.hsv_to_rgb(hue / 360.0, self.saturation, self.value)

    @property
    def mark_rgb(self) -> tuple[float, float, float]:
        """The marking's colour: the same hue and saturation, darker by ``shade``."""
        hue = (COLOUR_HUES[self.colour] + self.hue_jitter) % 360.0
        return colorsys.hsv_to_rgb(hue / 360.0, self.saturation, self.value * self.shade)


@dataclass(frozen=True)
class Scene:
    """One image: one to three objects (sorted left to right) on a background.

    Fields:
        things: the objects, one per slot, kept sorted by slot.
        ground: y of the ground line in px.
        bg_colour_a, bg_colour_b: muted gradient end colours, RGB in [0, 1].
        bg_angle: gradient direction in degrees.
        texture_seed, texture_amplitude: smooth brightness texture (amplitude in 0..255 levels).
        noise_seed, noise_amplitude: per-pixel uniform noise in [-amplitude, amplitude].
        pebbles: (x, y, radius) in px, all outside the band where objects can stand.
        pebble_colour: RGB in [0, 1] (dark grey to dark brown).
    """

    things: tuple[Thing, ...]
    ground: float = 94.0
    bg_colour_a: tuple[float, float, float] = (0.45, 0.45, 0.45)
    bg_colour_b: tuple[float, float, float] = (0.5, 0.5, 0.5)
    bg_angle: float = 0.0
    texture_seed: int = 0
    texture_amplitude: float = 4.0
    noise_seed: int = 0
    noise_amplitude: float = 3.0
    pebbles: tuple[tuple[float, float, float], ...] = ()
    pebble_colour: tuple[float, float, float] = (0.18, 0.15, 0.12)

    def __post_init__(self) -> None:
        things = tuple(sorted(self.things, key=lambda t: POSITIONS.index(t.position)))
        if not 1 <= len(things) <= len(POSITIONS):
            raise ValueError(f"a scene holds 1 to {len(POSITIONS)} objects, got {len(things)}")
        if len({t.position for t in things}) != len(things):
            raise ValueError("two objects in one slot: " + ", ".join(t.position for t in things))
        object.__setattr__(self, "things", things)  # canonical order: left to right

    def replace(self, **changes: Any) -> Scene:
        """Return a copy with ``changes`` applied; everything not named stays identical."""
        return dataclasses.replace(self, **changes)

    @property
    def positions(self) -> tuple[str, ...]:
        return tuple(t.position for t in self.things)

    @property
    def free_positions(self) -> tuple[str, ...]:
        return tuple(p for p in POSITIONS if p not in self.positions)

    @property
    def attributes(self) -> list[dict[str, str | None]]:
        """Each object's named attributes, left to right."""
        return [t.attributes for t in self.things]

    def thing_at(self, position: str) -> Thing:
        for thing in self.things:
            if thing.position == position:
                return thing
        raise KeyError(f"no object on the {position}; objects at {self.positions}")


# --------------------------------------------------------------------------- edits


def edit_thing(scene: Scene, at: str, **changes: Any) -> Scene:
    """The same scene with the object at slot ``at`` changed, e.g. ``pose="lying"``,
    ``colour="blue"`` or ``position="right"`` (which must be free).  Its identity details and
    everything else in the scene stay identical."""
    old = scene.thing_at(at)
    new = old.replace(**changes)
    if new.position != at and new.position in scene.positions:
        raise ValueError(f"cannot move to the {new.position}: that slot is taken")
    return scene.replace(things=tuple(new if t is old else t for t in scene.things))


def add_thing(scene: Scene, thing: Thing) -> Scene:
    """The same scene with ``thing`` added in its (free) slot."""
    if thing.position in scene.positions:
        raise ValueError(f"cannot add on the {thing.position}: that slot is taken")
    return scene.replace(things=(*scene.things, thing))


def remove_thing(scene: Scene, at: str) -> Scene:
    """The same scene without the object at slot ``at`` (a scene keeps at least one)."""
    scene.thing_at(at)
    return scene.replace(things=tuple(t for t in scene.things if t.position != at))


# --------------------------------------------------------------------------- primitives
# A primitive is a tuple: ("ellipse", cx, cy, a, b, angle_deg), ("capsule", x0, y0, x1, y1, r)
# (a thick segment; a circle when both ends coincide), ("polygon", vertices) for convex
# polygons, or ("band", cx, cy, angle_deg, half_width) -- an infinite stripe, used for markings.


def _rotate(x: float, y: float, angle: float) -> tuple[float, float]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return x * c - y * s, x * s + y * c


def _inside(prim: tuple, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean grid: which sample points (x a row vector, y a column vector) lie inside."""
    kind = prim[0]
    if kind == "ellipse":
        _, cx, cy, a, b, angle = prim
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        dx, dy = x - cx, y - cy
        u, v = dx * c + dy * s, dy * c - dx * s
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "capsule":
        _, x0, y0, x1, y1, r = prim
        ex, ey = x1 - x0, y1 - y0
        length2 = ex * ex + ey * ey
        dx, dy = x - x0, y - y0
        if length2 == 0.0:
            return dx * dx + dy * dy <= r * r
        t = np.clip((dx * ex + dy * ey) / length2, 0.0, 1.0)
        return (dx - t * ex) ** 2 + (dy - t * ey) ** 2 <= r * r
    if kind == "band":
        _, cx, cy, angle, half = prim
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        dist = np.abs((x - cx) * c + (y - cy) * s)
        return np.broadcast_to(dist <= half, np.broadcast_shapes(x.shape, y.shape))
    verts = prim[1]
    inside = np.ones(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for (px, py), (qx, qy) in zip(verts, verts[1:] + verts[:1]):
        inside &= (qx - px) * (y - py) - (qy - py) * (x - px) >= 0
    return inside


def _polygon(points: Sequence[tuple[float, float]]) -> tuple:
    """A convex polygon primitive with its vertices in the order ``_inside`` expects."""
    pts = [(float(x), float(y)) for x, y in points]
    area2 = sum(px * qy - qx * py for (px, py), (qx, qy) in zip(pts, pts[1:] + pts[:1]))
    return ("polygon", pts if area2 > 0 else pts[::-1])


def _bounds(prim: tuple) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of a primitive (bands are unbounded and never asked)."""
    kind = prim[0]
    if kind == "ellipse":
        _, cx, cy, a, b, angle = prim
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        hw, hh = math.hypot(a * c, b * s), math.hypot(a * s, b * c)
        return cx - hw, cx + hw, cy - hh, cy + hh
    if kind == "capsule":
        _, x0, y0, x1, y1, r = prim
        return min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r
    xs, ys = zip(*prim[1])
    return min(xs), max(xs), min(ys), max(ys)


def _mirror(prim: tuple) -> tuple:
    """The primitive mirrored at x = 0."""
    kind = prim[0]
    if kind == "ellipse":
        _, cx, cy, a, b, angle = prim
        return ("ellipse", -cx, cy, a, b, -angle)
    if kind == "capsule":
        _, x0, y0, x1, y1, r = prim
        return ("capsule", -x0, y0, -x1, y1, r)
    if kind == "band":
        _, cx, cy, angle, half = prim
        return ("band", -cx, cy, 180.0 - angle, half)
    return _polygon([(-x, y) for x, y in prim[1]])


def _translate(prim: tuple, ox: float, oy: float) -> tuple:
    kind = prim[0]
    if kind == "ellipse":
        _, cx, cy, a, b, angle = prim
        return ("ellipse", cx + ox, cy + oy, a, b, angle)
    if kind == "capsule":
        _, x0, y0, x1, y1, r = prim
        return ("capsule", x0 + ox, y0 + oy, x1 + ox, y1 + oy, r)
    if kind == "band":
        _, cx, cy, angle, half = prim
        return ("band", cx + ox, cy + oy, angle, half)
    return ("polygon", [(x + ox, y + oy) for x, y in prim[1]])


# --------------------------------------------------------------------------- geometry

# The cat's proportions: (body length, body aspect, head, leg, tail); sampled within these.
PROPORTION_RANGES: tuple[tuple[float, float], ...] = (
    (0.94, 1.06), (0.5, 0.58), (0.92, 1.08), (0.9, 1.1), (0.85, 1.15),
)  # fmt: skip
NOMINAL_PROPORTIONS: tuple[float, ...] = tuple((lo + hi) / 2 for lo, hi in PROPORTION_RANGES)
# The body turns by this much per pose (negative: front end up); the markings turn with it.
POSE_BODY_ANGLE: dict[str, float] = {"standing": 0.0, "sitting": -60.0, "lying": 0.0}


def _cat_parts(thing: Thing) -> tuple[list[tuple], tuple]:
    """The cat's parts (legs, tail, head, ears, neck) and its body, facing right, in px.

    The body is drawn last, on top, so its markings look the same in every pose.
    """
    length, aspect, head, leg, tail = thing.proportions or NOMINAL_PROPORTIONS
    k = thing.scale
    a = 12.0 * k * length  # body half-length
    b = a * aspect  # body half-height
    rh = 4.6 * k * head  # head radius
    ll = 8.5 * k * leg  # leg length
    lr = 1.4 * k  # leg radius
    lt = 10.0 * k * tail  # tail length
    tr = 1.2 * k  # tail radius
    angle = POSE_BODY_ANGLE[thing.pose]
    body = ("ellipse", 0.0, 0.0, a, b, angle)

    def at(u: float, v: float) -> tuple[float, float]:  # body frame -> local px
        return _rotate(u, v, angle)

    parts: list[tuple] = []
    nx, ny = at(0.78 * a, -0.85 * b)  # where the neck leaves the body
    if thing.pose == "standing":
        for u in (0.68, 0.38, -0.42, -0.7):
            parts.append(("capsule", u * a, 0.4 * b, u * a, b + ll, lr))
        tx, ty = -0.85 * a, -0.2 * b
        parts.append(("capsule", tx, ty, tx - 0.55 * lt, ty - 0.75 * lt, tr))
        hx, hy = nx + 0.35 * rh, ny - 0.45 * rh
    elif thing.pose == "sitting":
        c = math.cos(math.radians(angle))
        s = math.sin(math.radians(angle))
        ground = math.hypot(a * s, b * c)  # the body's lowest point
        for u in (0.5, 0.25):
            x, y = at(u * a, 0.4 * b)
            parts.append(("capsule", x, y, x, ground - lr, lr))
        bx, _ = at(-a, 0.0)  # the haunch: a folded hind leg along the ground
        parts.append(("capsule", bx + 1.5 * lr, ground - lr, bx + 0.9 * ll, ground - lr, lr))
        # The tail runs back along the ground and curls up: a notch keeps the outline concave.
        tail_x = bx - 0.4 * lt
        parts.append(("capsule", bx + tr, ground - tr, tail_x, ground - tr, tr))
        parts.append(("capsule", tail_x, ground - tr, tail_x - 0.2 * lt, ground - 0.55 * lt, tr))
        hx, hy = nx + 0.3 * rh, ny - 0.6 * rh
    else:  # lying: front legs stretched forward, hind leg folded, tail along the ground
        parts.append(("capsule", 0.45 * a, 0.65 * b, 0.45 * a + ll, b - lr, lr))
        parts.append(("capsule", 0.3 * a, 0.65 * b, 0.3 * a + 0.8 * ll, b - lr, lr))
        parts.append(("capsule", -0.5 * a, 0.55 * b, -0.5 * a + 0.6 * ll, b - lr, lr))
        tx, ty = -0.85 * a, 0.4 * b
        parts.append(("capsule", tx, ty, tx - 0.8 * lt, b - tr, tr))
        hx, hy = nx + 0.55 * rh, ny + 0.05 * rh
    parts.append(("capsule", *at(0.6 * a, -0.3 * b), hx, hy, 0.55 * rh))  # neck
    parts.append(("capsule", hx, hy, hx, hy, rh))  # head
    for ear in (-32.0, 22.0):  # two triangular ears, degrees from straight up
        points = []
        for spread, reach in ((-22.0, 0.8), (22.0, 0.8), (0.0, 1.75)):
            theta = math.radians(ear + spread)
            points.append((hx + reach * rh * math.sin(theta), hy - reach * rh * math.cos(theta)))
        parts.append(_polygon(points))
    return parts, body


def _rigid_body(thing: Thing) -> tuple:
    """The rigid shape, centred at the origin, rotated by ``thing.angle``."""
    r = RIGID_RADIUS * thing.scale
    if thing.kind == "circle":
        return ("capsule", 0.0, 0.0, 0.0, 0.0, r)
    if thing.kind == "square":
        h = 0.9 * r  # half-side
        corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
    else:  # equilateral triangle, apex up, centroid at the origin, circumradius 1.25 r
        corners = [(1.25 * r * math.cos(math.radians(p)), 1.25 * r * math.sin(math.radians(p)))
                   for p in (-90.0, 30.0, 150.0)]
    return _polygon([_rotate(x, y, thing.angle) for x, y in corners])


def _mark_frame(thing: Thing) -> tuple[float, float, float]:
    """(x unit, y unit, angle) of the marking frame, in which marks are stored.

    The frame turns with the body (the cat's) or the shape.  One unit is the cat's body
    half-height, or a rigid shape's inradius, in both directions.
    """
    if thing.kind == "cat":
        length, aspect = (thing.proportions or NOMINAL_PROPORTIONS)[:2]
        b = 12.0 * thing.scale * length * aspect
        return b, b, POSE_BODY_ANGLE[thing.pose]
    r = RIGID_RADIUS * thing.scale
    unit = {"circle": r, "square": 0.9 * r, "triangle": 0.625 * r}[thing.kind]
    return unit, unit, thing.angle


def _marks(thing: Thing) -> list[tuple]:
    """The marking primitives in local px (clipped to the body when drawn)."""
    ux, uy, angle = _mark_frame(thing)
    prims = []
    for x, y, r in thing.marks:
        cx, cy = _rotate(x * ux, y * uy, angle)
        if thing.marking == "stripes":
            prims.append(("band", cx, cy, angle, r * ux))
        else:
            prims.append(("capsule", cx, cy, cx, cy, r * ux))
    return prims


def _local_shape(thing: Thing) -> tuple[list[tuple], tuple, list[tuple]]:
    """(parts, body, marks) facing right in local px; ``body`` carries the marks."""
    if thing.kind in POSED_KINDS:
        parts, body = _cat_parts(thing)
    else:
        parts, body = [], _rigid_body(thing)
    return parts, body, _marks(thing)


def _slot_centre(position: str) -> float:
    return (POSITIONS.index(position) + 0.5) * SLOT_WIDTH


def _placed_shape(thing: Thing, ground: float) -> tuple[list[tuple], tuple, list[tuple]]:
    """The shape in image px: mirrored for ``facing``, its box centred in its slot (plus
    jitter) and its base on the ground line (plus ``drop``)."""
    parts, body, marks = _local_shape(thing)
    if thing.facing < 0:
        parts, body, marks = [_mirror(p) for p in parts], _mirror(body), [_mirror(m) for m in marks]
    x0, x1, y0, y1 = _box([*parts, body])
    room = max(0.0, (SLOT_WIDTH - (x1 - x0)) / 2 - SLOT_MARGIN)
    ox = _slot_centre(thing.position) + thing.jitter_x * room - (x0 + x1) / 2
    oy = ground + thing.drop - y1
    return (
        [_translate(p, ox, oy) for p in parts],
        _translate(body, ox, oy),
        [_translate(m, ox, oy) for m in marks],
    )


def _box(prims: Sequence[tuple]) -> tuple[float, float, float, float]:
    boxes = [_bounds(p) for p in prims]
    return (min(b[0] for b in boxes), max(b[1] for b in boxes),
            min(b[2] for b in boxes), max(b[3] for b in boxes))


def thing_box(thing: Thing, ground: float) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of the object as drawn in a scene with this ground line, px."""
    parts, body, _ = _placed_shape(thing, ground)
    return _box([*parts, body])


def _layers(thing: Thing, ground: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(y0, x0, coverage, marking coverage) of the object over its box, float32 in [0, 1].

    Each primitive is only evaluated over its own box, which keeps a render in milliseconds.
    """
    parts, body, marks = _placed_shape(thing, ground)
    bx0, bx1, by0, by1 = _box([*parts, body])
    x0, x1 = max(0, int(bx0)), min(IMAGE_SIZE, int(math.ceil(bx1)) + 1)
    y0, y1 = max(0, int(by0)), min(IMAGE_SIZE, int(math.ceil(by1)) + 1)
    ss = SUPERSAMPLE
    xs = (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss + x0
    ys = (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss + y0
    inside = np.zeros((ys.size, xs.size), dtype=bool)

    def window(prim: tuple) -> tuple[slice, slice]:
        px0, px1, py0, py1 = _bounds(prim)
        i0, i1 = int(max(0, (px0 - x0) * ss)), int(min(xs.size, (px1 - x0) * ss + 2))
        j0, j1 = int(max(0, (py0 - y0) * ss)), int(min(ys.size, (py1 - y0) * ss + 2))
        return slice(j0, j1), slice(i0, i1)

    for prim in parts:
        rows, cols = window(prim)
        inside[rows, cols] |= _inside(prim, xs[None, cols], ys[rows, None])
    rows, cols = window(body)
    in_body = _inside(body, xs[None, cols], ys[rows, None])
    inside[rows, cols] |= in_body
    marked = np.zeros_like(inside)
    if marks:
        hit = np.zeros_like(in_body)
        for mark in marks:
            hit |= _inside(mark, xs[None, cols], ys[rows, None])
        marked[rows, cols] = in_body & hit

    def pool(grid: np.ndarray) -> np.ndarray:  # the share of each pixel's samples inside
        counts = grid.view(np.uint8).reshape(y1 - y0, ss, x1 - x0, ss).sum(axis=(1, 3))
        return counts.astype(np.float32) / (ss * ss)

    return y0, x0, pool(inside), pool(marked)


def thing_coverage(thing: Thing, ground: float) -> np.ndarray:
    """Anti-aliased coverage of one object, (128, 128) float32 in [0, 1]."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    y0, x0, cov, _ = _layers(thing, ground)
    out[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] = cov
    return out


def thing_masks(scene: Scene) -> list[np.ndarray]:
    """Ground-truth mask of each object (pixels at least half covered), left to right."""
    return [thing_coverage(t, scene.ground) >= 0.5 for t in scene.things]


def marking_coverage(thing: Thing, ground: float) -> np.ndarray:
    """Anti-aliased coverage of the object's marking, (128, 128) float32 in [0, 1]."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    y0, x0, _, cov = _layers(thing, ground)
    out[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] = cov
    return out


@cache
def nominal_area(kind: str, pose: str | None) -> float:
    """Area in px of an object of ``kind`` and ``pose`` at scale 1 with nominal proportions
    (the detectors divide a found area by it to read the size)."""
    thing = Thing(kind=kind, pose=pose, colour=COLOURS[0], size="large", position="middle",
                  scale_u=1.0, proportions=NOMINAL_PROPORTIONS if kind in POSED_KINDS else ())
    _, _, cov, _ = _layers(thing, GROUND_RANGE[1])
    return float(cov.sum()) / SIZE_SCALES["large"][1] ** 2


def object_band(ground: float) -> tuple[float, float]:
    """(top, bottom) y of the band in which objects can stand on this ground line."""
    return ground - DROP - MAX_HEIGHT, ground + DROP


# --------------------------------------------------------------------------- sampling


# Marks per kind, in marking-frame units: spot radius and stripe half-width ranges, how far
# from the centre a stripe's centre may lie, the gap kept between two marks (about 2 px on the
# smallest objects, so marks never merge when read) and between a spot and the rim (~1 px).
_MARK_LAYOUT: dict[str, dict[str, Any]] = {
    "cat": {"spot": (0.34, 0.4), "stripe": (0.26, 0.32), "stripe_room": 0.66, "gap": 0.36,
            "stripe_gap": 0.5, "rim": 0.15},
    "circle": {"spot": (0.24, 0.3), "stripe": (0.13, 0.17), "stripe_room": 0.62, "gap": 0.25,
               "rim": 0.12},
    "square": {"spot": (0.26, 0.32), "stripe": (0.14, 0.18), "stripe_room": 0.66, "gap": 0.27,
               "rim": 0.13},
    "triangle": {"spot": (0.3, 0.36), "stripe": (0.15, 0.19), "stripe_room": 0.8, "gap": 0.32,
                 "rim": 0.2},
}
# Outward edge normals of the triangle in its own frame (apex up, inradius 1).
_TRIANGLE_NORMALS = ((0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5))


def _fits(kind: str, aspect: float, x: np.ndarray, y: np.ndarray, clearance: np.ndarray):
    """Which points (x, y) lie at least ``clearance`` inside the marked region (frame units)."""
    if kind == "cat":  # the body ellipse, half-axes 1 / aspect and 1, shrunk by the clearance
        a, b = 1.0 / aspect - clearance, np.maximum(1.0 - clearance, 1e-6)
        return (x / a) ** 2 + (y / b) ** 2 <= 1.0
    if kind == "circle":
        return np.hypot(x, y) <= 1.0 - clearance
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 1.0 - clearance
    reach = np.max([x * nx + y * ny for nx, ny in _TRIANGLE_NORMALS], axis=0)
    return reach <= 1.0 - clearance


def _sample_marks(
    kind: str, marking: str, proportions: tuple[float, ...], rng: np.random.Generator
) -> tuple[tuple[float, float, float], ...]:
    """One to three stripes or spots, kept apart and off the rim."""
    layout = _MARK_LAYOUT[kind]
    gap = layout["gap"]
    aspect = (proportions or NOMINAL_PROPORTIONS)[1] if kind == "cat" else 1.0
    count = int(rng.integers(1, 4))
    if marking == "stripes":
        # Widths first, then the free room split at random between the gaps: always fits.
        room = layout["stripe_room"] / aspect  # the cat's: a share of its half-length
        halves = [float(h) for h in rng.uniform(*layout["stripe"], size=count)]
        gap = layout.get("stripe_gap", gap)
        needed = float(sum(h1 + h2 + gap for h1, h2 in zip(halves, halves[1:])))
        spare = np.diff(np.sort(rng.uniform(0.0, 2 * room - needed, size=count + 1)),
                        prepend=0.0).tolist()
        x, marks = -room, []
        for i, half in enumerate(halves):
            x += spare[i] + (halves[i - 1] + half + gap if i else 0.0)
            marks.append((x, 0.0, half))
        return tuple(marks)
    # Spots: candidates drawn in batches and taken in order when clear of those taken so far;
    # one spot fewer if no batch yields enough (the layouts make that rare).
    while True:
        for _attempt in range(50):
            r = rng.uniform(*layout["spot"], size=128)
            x, y = rng.uniform(-1.0, 1.0, size=(2, 128)) * np.array([[1.0 / aspect], [1.0]])
            free = _fits(kind, aspect, x, y, r + layout["rim"])
            spots: list[tuple[float, float, float]] = []
            while free.any() and len(spots) < count:
                i = int(free.argmax())
                spots.append((float(x[i]), float(y[i]), float(r[i])))
                free &= np.hypot(x - x[i], y - y[i]) >= r + r[i] + gap
            if len(spots) == count:
                return tuple(sorted(spots))
        count -= 1


def sample_thing(
    rng_or_seed: np.random.Generator | int | None = None, position: str | None = None, **fixed: Any
) -> Thing:
    """Draw a random object; ``fixed`` pins named attributes (kind, pose, colour, size).

    The same random numbers are drawn whatever is fixed, so ``sample_thing(s, colour="red")``
    equals ``sample_thing(s).replace(colour="red")``, and likewise for size and a cat's pose.
    Fixing the kind changes the details that depend on it (marking layout, proportions).
    """
    unknown = set(fixed) - {"kind", "pose", "colour", "size"}
    if unknown:
        raise TypeError(f"unknown attributes {sorted(unknown)}; expected kind, pose, colour, size")
    rng = as_rng(rng_or_seed)
    attrs: dict[str, Any] = {
        "kind": KINDS[rng.integers(len(KINDS))],
        "pose": POSES[rng.integers(len(POSES))],
        "colour": COLOURS[rng.integers(len(COLOURS))],
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }
    if position is not None:
        attrs["position"] = position
    attrs.update(fixed)
    posed = attrs["kind"] in POSED_KINDS
    if not posed:
        attrs["pose"] = None
    proportions = tuple(float(rng.uniform(lo, hi)) for lo, hi in PROPORTION_RANGES)
    marking = MARKINGS[rng.integers(len(MARKINGS))]
    mark_seed = int(rng.integers(2**31))
    latent = dict(
        scale_u=float(rng.uniform()),
        jitter_x=float(rng.uniform(-1.0, 1.0)),
        drop=float(rng.uniform(-DROP, DROP)),
        angle=0.0 if posed else float(rng.uniform(-RIGID_MAX_ANGLE, RIGID_MAX_ANGLE)),
        facing=int(rng.choice([1, -1])),
        hue_jitter=float(rng.uniform(-HUE_JITTER, HUE_JITTER)),
        saturation=float(rng.uniform(*SATURATION_RANGE)),
        value=float(rng.uniform(*VALUE_RANGE)),
        shade=float(rng.uniform(*SHADE_RANGE)),
    )
    proportions = proportions if posed else ()
    marks = _sample_marks(attrs["kind"], marking, proportions, np.random.default_rng(mark_seed))
    return Thing(**attrs, **latent, marking=marking, marks=marks, proportions=proportions)


def _place_pebbles(
    ground: float, rng: np.random.Generator, count: int
) -> tuple[tuple[float, float, float], ...]:
    """Pebbles above or below the object band, clear of it and of each other."""
    top, bottom = object_band(ground)
    pebbles: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = float(rng.uniform(1.8, 3.0))
        for _try in range(200):
            x, y = rng.uniform(r + 1.0, IMAGE_SIZE - r - 1.0, size=2)
            clear_of_band = y + r <= top - PEBBLE_GAP or y - r >= bottom + PEBBLE_GAP
            if clear_of_band and all(
                math.hypot(x - px, y - py) >= r + pr + 4.0 for px, py, pr in pebbles
            ):
                pebbles.append((float(x), float(y), r))
                break
    return tuple(pebbles)


def sample_scene(
    rng_or_seed: np.random.Generator | int | None = None,
    count: int | None = None,
    specs: Sequence[dict[str, Any]] | None = None,
) -> Scene:
    """Draw a random scene of ``count`` objects (1 to 3 at random by default).

    ``specs`` pins objects instead: one dict per object of fixed attributes, ``position``
    included or not, e.g. ``[{"kind": "cat", "pose": "sitting", "position": "left"}, {}]``.
    Each slot's object comes from its own seed, drawn whatever the count, so two scenes of one
    seed that share a slot share that object; the background does not depend on the objects.
    """
    rng = as_rng(rng_or_seed)
    slot_seeds = [int(s) for s in rng.integers(2**31, size=len(POSITIONS))]
    drawn_count = int(rng.integers(1, len(POSITIONS) + 1))
    order = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))]
    if specs is None:
        specs = [{} for _ in range(drawn_count if count is None else count)]
    elif count is not None and count != len(specs):
        raise ValueError(f"count={count} but {len(specs)} specs")
    specs = [dict(s) for s in specs]
    pinned = [s["position"] for s in specs if "position" in s]
    free = [p for p in order if p not in pinned]
    for spec in specs:
        if "position" not in spec:
            if not free:
                raise ValueError("more objects than slots")
            spec["position"] = free.pop(0)
    things = tuple(
        sample_thing(slot_seeds[POSITIONS.index(spec["position"])], **spec) for spec in specs
    )
    ground = float(rng.uniform(*GROUND_RANGE))
    scene = Scene(
        things=things,
        ground=ground,
        bg_colour_a=sample_background_colour(rng, BG_SATURATION, BG_VALUE),
        bg_colour_b=sample_background_colour(rng, BG_SATURATION, BG_VALUE),
        bg_angle=float(rng.uniform(0.0, 360.0)),
        texture_seed=int(rng.integers(2**31)),
        texture_amplitude=float(rng.uniform(3.0, 6.0)),
        noise_seed=int(rng.integers(2**31)),
        noise_amplitude=float(rng.uniform(2.0, 4.0)),
        pebble_colour=sample_pebble_colour(rng),
    )
    n_pebbles = int(rng.integers(3, 7))
    pebbles = _place_pebbles(ground, np.random.default_rng(int(rng.integers(2**31))), n_pebbles)
    return scene.replace(pebbles=pebbles)


def sample_thing_for(
    scene: Scene, rng_or_seed: np.random.Generator | int | None = None,
    position: str | None = None, **fixed: Any,
) -> Thing:
    """A random new object for a free slot of ``scene`` (the first free one by default)."""
    free = scene.free_positions
    if not free:
        raise ValueError("the scene has no free slot")
    position = free[0] if position is None else position
    if position not in free:
        raise ValueError(f"the {position} slot is taken")
    return sample_thing(rng_or_seed, position=position, **fixed)


# --------------------------------------------------------------------------- rendering


@cache
def _bilinear(cells: int) -> np.ndarray:
    """Weights (128, cells + 1) that interpolate a grid of cells + 1 nodes across the image."""
    pixels = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE
    nodes = np.linspace(0.0, 1.0, cells + 1, dtype=np.float32)
    return np.maximum(0.0, 1.0 - np.abs(pixels[:, None] - nodes[None, :]) * cells)


def _texture(seed: int, amplitude: float) -> np.ndarray:
    """Smooth brightness texture: two octaves of bilinearly upsampled random grids, (128, 128)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for cells, weight in ((6, 0.7), (14, 0.3)):
        grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
        w = _bilinear(cells)
        out += weight * (w @ grid @ w.T)
    return out * amplitude


def _disc_coverage(x: float, y: float, r: float) -> tuple[int, int, np.ndarray]:
    """(y0, x0, coverage) of a disc over its own small box."""
    ss = SUPERSAMPLE
    x0, x1 = max(0, int(x - r - 1)), min(IMAGE_SIZE, int(x + r + 2))
    y0, y1 = max(0, int(y - r - 1)), min(IMAGE_SIZE, int(y + r + 2))
    xs = (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss + x0
    ys = (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss + y0
    inside = _inside(("capsule", x, y, x, y, r), xs[None, :], ys[:, None])
    return y0, x0, inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)


def pebble_mask(scene: Scene) -> np.ndarray:
    """Pixels at least half covered by a pebble, (128, 128) bool."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for x, y, r in scene.pebbles:
        y0, x0, cov = _disc_coverage(x, y, r)
        out[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] |= cov >= 0.5
    return out


# Rendering works channel-first, (3, 128, 128) float32 in 0..255: numpy is much faster over
# long rows than over a trailing axis of three.


def _blend(img: np.ndarray, y0: int, x0: int, cov: np.ndarray, rgb: Sequence[float]) -> None:
    """Paint colour ``rgb`` (0..1) over ``img`` with coverage ``cov`` at (y0, x0), in place."""
    h, w = cov.shape
    for channel, value in zip(img[:, y0 : y0 + h, x0 : x0 + w], rgb):
        channel += (np.float32(value * 255.0) - channel) * cov


@lru_cache(maxsize=8)
def _background_arrays(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(background without noise, noise), both float32 (3, 128, 128), read-only.

    Cached by the background's fields, because an edit re-renders the same background.
    """
    bg_colour_a, bg_colour_b, bg_angle, texture_seed, texture_amplitude, noise_seed, \
        noise_amplitude, pebbles, pebble_colour = key
    t = gradient(IMAGE_SIZE, bg_angle)
    texture = _texture(texture_seed, texture_amplitude)
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, (a, b) in enumerate(zip(bg_colour_a, bg_colour_b)):
        img[i] = np.float32(a * 255) + np.float32((b - a) * 255) * t + texture
    for x, y, r in pebbles:
        _blend(img, *_disc_coverage(x, y, r), pebble_colour)
    noise = np.random.default_rng(noise_seed).random(img.shape, dtype=np.float32)
    noise = (2 * noise_amplitude) * noise - noise_amplitude
    img.flags.writeable = noise.flags.writeable = False
    return img, noise


def _background(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The scene's (background, noise) arrays; see :func:`_background_arrays`."""
    return _background_arrays((
        scene.bg_colour_a, scene.bg_colour_b, scene.bg_angle, scene.texture_seed,
        scene.texture_amplitude, scene.noise_seed, scene.noise_amplitude, scene.pebbles,
        scene.pebble_colour,
    ))


def _paint(img: np.ndarray, thing: Thing, ground: float) -> None:
    """Draw one object into ``img`` in place (only its box is touched)."""
    y0, x0, cov, marked = _layers(thing, ground)
    h, w = cov.shape
    body = cov - marked
    region = img[:, y0 : y0 + h, x0 : x0 + w]
    for channel, b, m in zip(region, thing.rgb, thing.mark_rgb):
        channel *= 1.0 - cov
        channel += np.float32(b * 255.0) * body + np.float32(m * 255.0) * marked


def _finish(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Add the per-pixel noise, quantise to uint8 and return (128, 128, 3)."""
    img += noise
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def render(scene: Scene) -> np.ndarray:
    """Render the scene as a deterministic uint8 array of shape (128, 128, 3)."""
    background, noise = _background(scene)
    img = background.copy()
    for thing in scene.things:
        _paint(img, thing, scene.ground)
    return _finish(img, noise)


def render_background(scene: Scene) -> np.ndarray:
    """The scene without its objects (gradient, texture, pebbles, noise), uint8 (128, 128, 3)."""
    background, noise = _background(scene)
    return _finish(background.copy(), noise)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Render several scenes into one uint8 array (N, 128, 128, 3)."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene)
    return out


# --------------------------------------------------------------------------- captions

_WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


def describe(thing: Thing | dict[str, Any]) -> str:
    """One object's phrase, e.g. "a large red cat sitting on the left"."""
    attrs = thing.attributes if isinstance(thing, Thing) else thing
    words = ["a", attrs["size"], attrs["colour"], attrs["kind"]]
    if attrs.get("pose"):
        words.append(attrs["pose"])
    return " ".join(words) + " " + _WHERE[attrs["position"]]


def caption(
    scene: Scene | Sequence[dict[str, Any]],
    rng: np.random.Generator | None = None,
    prefix: int | str | None = None,
) -> str:
    """Describe every object, left to right, joined by "and", after one of :data:`PREFIXES`.

    E.g. "a photo of a large red cat sitting on the left and a small blue square on the right".
    ``prefix`` is an index into PREFIXES or the text itself; otherwise ``rng`` picks one, and
    with neither there is none.
    """
    things = scene.things if isinstance(scene, Scene) else scene
    if prefix is None:
        prefix = int(rng.integers(len(PREFIXES))) if rng is not None else 0
    if isinstance(prefix, int):
        prefix = PREFIXES[prefix]
    ordered = sorted(things, key=lambda t: POSITIONS.index(
        t.position if isinstance(t, Thing) else t["position"]))
    return prefix + " and ".join(describe(t) for t in ordered)


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """Read the objects back from a caption, in caption order; a missing attribute is None.

    Objects are separated by the word "and"; within one, each attribute is the first word of
    its kind (a rigid kind's pose is None).
    """
    words = re.findall(r"[a-z]+", text.lower())
    chunks: list[list[str]] = [[]]
    for word in words:
        if word == "and":
            chunks.append([])
        else:
            chunks[-1].append(word)
    found = []
    for chunk in chunks:
        if not any(w in KINDS or w in COLOURS or w in POSES or w in POSITIONS for w in chunk):
            continue
        found.append({
            name: next((w for w in chunk if w in values), None)
            for name, values in zip(ATTRIBUTES, (KINDS, POSES, COLOURS, SIZES, POSITIONS))
        })
    return found


def random_caption_and_scene(rng: np.random.Generator | int | None = None) -> tuple[Scene, str]:
    """A random scene and a randomly phrased caption of it (training-data convenience)."""
    rng = as_rng(rng)
    scene = sample_scene(rng)
    return scene, caption(scene, rng=rng)


# The example images of this world shipped in the package (scripts/make_examples.py renders
# them): file name -> (scene seed, the edit its example text asks for), so that an edit of one
# can be scored against the scene the text describes (`example_scenes`).
EXAMPLES: dict[str, tuple[int, dict[str, Any]]] = {
    "purple-cat-standing": (0, {"edit": "pose", "at": "right", "pose": "sitting"}),
    "triangle-and-cat": (4, {"edit": "remove", "at": "middle"}),
    "green-triangle": (2, {"edit": "add", "at": "right", "kind": "circle", "colour": "red",
                           "size": "small"}),
}


def example_scenes(name: str) -> tuple[Scene, Scene]:
    """(source, target) of a shipped example: the scene its image shows, and that scene with
    the example's edit (an added object's unnamed details are drawn from the same seed)."""
    seed, edit = EXAMPLES[name]
    source = sample_scene(seed)
    changes = {k: v for k, v in edit.items() if k not in ("edit", "at")}
    if edit["edit"] == "remove":
        return source, remove_thing(source, edit["at"])
    if edit["edit"] == "add":
        return source, add_thing(source, sample_thing_for(source, seed, position=edit["at"],
                                                          **changes))
    return source, edit_thing(source, edit["at"], **changes)
