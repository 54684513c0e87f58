"""ShapesWorld: a procedural world of 32x32 RGB images with a known ground truth.

Every image shows one saturated object (a circle, square or triangle of one of six colours, small
or large, in one of nine grid cells) on a muted background: a linear gradient between two
low-saturation colours, fine per-pixel noise and one to three small dark pebbles.  The object is
always saturated and bright while the background never is, which is what makes the analytic
detectors in :mod:`imagic.shapes.detect` reliable.

A :class:`Scene` stores the four attributes plus *latent* jitter (offsets, size fraction, hue
shift, rotation, background parameters).  The pixel geometry (centre, radius) is derived from the
attributes and the latent jitter, so ``scene.replace(colour="blue")`` yields "the same image with
one attribute changed": background, noise, pebbles and jitter stay identical, and a position or
size change re-derives the centre or radius consistently.  That is what editing benchmarks need.

Pebbles are placed clear of the object's footprint for *every* shape and size at the scene's own
position, so colour, shape and size edits never touch them.  A position edit moves the object to
a cell the pebbles were not told to avoid; pass ``avoid_positions`` to :func:`sample_scene` (or
check :func:`pebbles_clear_of`) when a benchmark needs pebbles clear of the edited object too.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import as_rng, gradient, sample_background_colour, sample_pebble_colour

IMAGE_SIZE = 32
SUPERSAMPLE = 8  # render geometry at 8x and box-filter down: cheap, smooth anti-aliasing

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")

# Canonical hues in degrees.  Neighbours are >= 25 degrees apart and the render jitter is only
# +-5 degrees, so a nearest-hue rule separates them with a wide margin.
COLOUR_HUES: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 55.0,
    "green": 120.0,
    "blue": 220.0,
    "purple": 280.0,
}

# Nominal radius ranges in pixels (32 px scale).  The gap (5.0 -> 7.0, a factor 1.4 in radius,
# ~2 in area) keeps the two sizes separable by area after jitter, anti-aliasing and noise.
SIZE_RADII: dict[str, tuple[float, float]] = {"small": (4.4, 5.0), "large": (7.0, 7.5)}

# Each shape's characteristic length relative to the nominal radius: a square's half-side and a
# triangle's circumradius.  Chosen so the three shapes look similarly big (areas within ~1.5x)
# while a large triangle still fits in a corner cell.
SHAPE_SCALE: dict[str, float] = {"circle": 1.0, "square": 0.9, "triangle": 1.25}
# Area of each shape divided by the nominal radius squared (used by the detector to size it).
SHAPE_AREA_FACTOR: dict[str, float] = {
    "circle": math.pi,
    "square": 4.0 * SHAPE_SCALE["square"] ** 2,
    "triangle": 3.0 * math.sqrt(3.0) / 4.0 * SHAPE_SCALE["triangle"] ** 2,
}

CELL = IMAGE_SIZE / 3.0
POSITION_JITTER = 1.0  # pixels, each axis
HUE_JITTER = 5.0  # degrees
MAX_ANGLE = 15.0  # degrees of rotation for squares and triangles
EDGE_MARGIN = 0.5  # keep every object this far inside the image border
# The background's HSV saturation and value ranges: muted and mid to dark, so it is never
# mistaken for an object.
BG_SATURATION = (0.05, 0.28)
BG_VALUE = (0.3, 0.6)

TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} at the {position}",
    "a photo of a {size} {colour} {shape} at the {position}",
    "a {size} {colour} {shape} in the {position}",
    "an image of a {size} {colour} {shape} in the {position}",
    "there is a {size} {colour} {shape} at the {position}",
)


def _template_words() -> set[str]:
    words: set[str] = set()
    for template in TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return words


VOCABULARY: list[str] = sorted(
    _template_words()
    | set(SHAPES)
    | set(COLOURS)
    | set(SIZES)
    | {w for p in POSITIONS for w in p.split()}
)


@dataclass(frozen=True)
class Scene:
    """One ShapesWorld image: four attributes, latent jitter and background parameters.

    Pixel geometry is *derived* (see :attr:`centre`, :attr:`radius`, :attr:`rgb`) from the
    attributes and the latent jitter fields, so replacing an attribute re-derives it consistently
    while every other parameter stays bit-identical.

    Fields:
        shape, colour, size, position: attribute names (see SHAPES, COLOURS, SIZES, POSITIONS).
        jitter_x, jitter_y: centre offset from the cell anchor in pixels, in [-1, 1].
        size_u: where the radius lies within its size's range, in [0, 1].
        hue_jitter: degrees added to the colour's canonical hue.
        saturation, value: the object's HSV saturation and brightness (both high).
        angle: rotation in degrees (ignored for circles).
        bg_colour_a, bg_colour_b: the two muted gradient end colours, RGB in [0, 1].
        bg_angle: gradient direction in degrees.
        noise_seed, noise_amplitude: per-pixel uniform noise in [-amplitude, amplitude] (0..255).
        pebbles: tuple of (x, y, radius) in pixels.
        pebble_colour: RGB in [0, 1] (dark grey/brown).
    """

    shape: str
    colour: str
    size: str
    position: str
    jitter_x: float = 0.0
    jitter_y: float = 0.0
    size_u: float = 0.5
    hue_jitter: float = 0.0
    saturation: float = 0.9
    value: float = 0.9
    angle: float = 0.0
    bg_colour_a: tuple[float, float, float] = (0.4, 0.4, 0.4)
    bg_colour_b: tuple[float, float, float] = (0.3, 0.3, 0.3)
    bg_angle: float = 0.0
    noise_seed: int = 0
    noise_amplitude: float = 3.0
    pebbles: tuple[tuple[float, float, float], ...] = ()
    pebble_colour: tuple[float, float, float] = (0.18, 0.15, 0.12)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} not in {allowed}")

    def replace(self, **changes: Any) -> Scene:
        """Return a copy with ``changes`` applied; everything not named stays identical."""
        return dataclasses.replace(self, **changes)

    @property
    def attributes(self) -> dict[str, str]:
        """The four attributes as a dict (what captions and detectors talk about)."""
        return {a: getattr(self, a) for a in ATTRIBUTES}

    @property
    def radius(self) -> float:
        """Nominal radius in pixels: the size's range interpolated by ``size_u``."""
        lo, hi = SIZE_RADII[self.size]
        return lo + (hi - lo) * self.size_u

    @property
    def centre(self) -> tuple[float, float]:
        """Object centre (x, y) in pixels: cell anchor + jitter, pushed inside the image."""
        return _object_centre(
            self.shape, self.position, self.radius, self.angle, self.jitter_x, self.jitter_y
        )

    @property
    def rgb(self) -> tuple[float, float, float]:
        """Object colour, RGB in [0, 1]."""
        hue = (COLOUR_HUES[self.colour] + self.hue_jitter) % 360.0
        return colorsys.hsv_to_rgb(hue / 360.0, self.saturation, self.value)


# --------------------------------------------------------------------------- geometry


def _cell_anchor(position: str) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def _outline(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray | None:
    """Polygon vertices (k, 2) for squares and triangles, None for circles."""
    length = SHAPE_SCALE[shape] * radius
    theta = math.radians(angle)
    if shape == "circle":
        return None
    if shape == "square":
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * length
    else:  # equilateral triangle, apex up, centroid at the centre
        phis = np.radians([-90.0, 30.0, 150.0])
        corners = np.stack([np.cos(phis), np.sin(phis)], axis=1) * length
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return corners @ rot.T + np.array([cx, cy])


def _extent(shape: str, radius: float, angle: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) reach of the shape from its centre, in pixels."""
    verts = _outline(shape, 0.0, 0.0, radius, angle)
    if verts is None:
        return radius, radius, radius, radius
    return -verts[:, 0].min(), verts[:, 0].max(), -verts[:, 1].min(), verts[:, 1].max()


def _object_centre(
    shape: str, position: str, radius: float, angle: float, jitter_x: float, jitter_y: float
) -> tuple[float, float]:
    """Anchor + jitter, then clamped so the whole shape is inside the image.

    Clamping only bites for large objects in edge cells; the centre still stays inside its cell
    (a large triangle reaches at most ~9.4 px, the cell boundary is at 10.67 px).
    """
    ax, ay = _cell_anchor(position)
    left, right, up, down = _extent(shape, radius, angle)
    cx = min(max(ax + jitter_x, left + EDGE_MARGIN), IMAGE_SIZE - right - EDGE_MARGIN)
    cy = min(max(ay + jitter_y, up + EDGE_MARGIN), IMAGE_SIZE - down - EDGE_MARGIN)
    return float(cx), float(cy)


def _bounding_radius(shape: str, radius: float) -> float:
    """Radius of a circle around the centre that contains the shape at any rotation."""
    if shape == "square":
        return SHAPE_SCALE["square"] * radius * math.sqrt(2.0)
    return SHAPE_SCALE[shape] * radius


def _coverage(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (32, 32) float32.

    Only the shape's bounding box is supersampled, which keeps a render well under a
    millisecond.
    """
    reach = _bounding_radius(shape, radius) + 1.0
    x0, x1 = max(0, int(cx - reach)), min(IMAGE_SIZE, int(math.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(IMAGE_SIZE, int(math.ceil(cy + reach)))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    ss = SUPERSAMPLE
    xs = (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss + x0
    ys = (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss + y0
    xs, ys = xs[None, :], ys[:, None]
    verts = _outline(shape, cx, cy, radius, angle)
    if verts is None:
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    else:
        # Convex polygon with clockwise-on-screen vertex order: inside = left of every edge.
        inside = np.ones((ys.shape[0], xs.shape[1]), dtype=bool)
        for (px, py), (qx, qy) in zip(verts, np.roll(verts, -1, axis=0)):
            inside &= (qx - px) * (ys - py) - (qy - py) * (xs - px) >= 0
    local = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)
    out[y0:y1, x0:x1] = local
    return out


def object_coverage(scene: Scene) -> np.ndarray:
    """Anti-aliased coverage of the scene's object, (32, 32) float32 in [0, 1]."""
    cx, cy = scene.centre
    return _coverage(scene.shape, cx, cy, scene.radius, scene.angle)


def object_mask(scene: Scene) -> np.ndarray:
    """Ground-truth object mask: pixels at least half covered by the object, (32, 32) bool."""
    return object_coverage(scene) >= 0.5


def _pebble_coverage(scene: Scene) -> np.ndarray:
    cov = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for x, y, r in scene.pebbles:
        cov = np.maximum(cov, _coverage("circle", x, y, r, 0.0))
    return cov


def pebble_mask(scene: Scene) -> np.ndarray:
    """Pixels at least half covered by a pebble, (32, 32) bool (occlusion by the object ignored)."""
    return _pebble_coverage(scene) >= 0.5


# --------------------------------------------------------------------------- pebbles


def _footprints(scene: Scene, positions: Iterable[str]) -> list[tuple[float, float, float]]:
    """Bounding circles (x, y, r) of the object for every shape and size at ``positions``.

    Uses the scene's own latent jitter, i.e. exactly the objects that ``scene.replace`` of
    shape, size or position would produce.
    """
    circles = []
    for position in positions:
        for shape in SHAPES:
            for size in SIZES:
                s = scene.replace(shape=shape, size=size, position=position)
                cx, cy = s.centre
                circles.append((cx, cy, _bounding_radius(shape, s.radius)))
    return circles


def _clear(
    x: float, y: float, r: float, circles: Sequence[tuple[float, float, float]], gap: float = 1.0
) -> bool:
    return all(math.hypot(x - cx, y - cy) >= r + cr + gap for cx, cy, cr in circles)


def pebbles_clear_of(scene: Scene, positions: Iterable[str] | None = None) -> bool:
    """True if no pebble can touch the object of any shape/size at ``positions``.

    ``positions`` defaults to the scene's own position (always true for sampled scenes); a
    benchmark planning a position edit can check the target cell with it.
    """
    circles = _footprints(scene, [scene.position] if positions is None else positions)
    return all(_clear(x, y, r, circles) for x, y, r in scene.pebbles)


def _place_pebbles(
    scene: Scene, rng: np.random.Generator, count: int, avoid_positions: Sequence[str]
) -> tuple[tuple[float, float, float], ...]:
    """Rejection-sample pebbles clear of the object footprints and of each other.

    Footprints at ``avoid_positions`` are avoided too when possible; if a pebble cannot be
    placed that way, it falls back to avoiding only the scene's own position.
    """
    own = _footprints(scene, [scene.position])
    extra = _footprints(scene, [p for p in avoid_positions if p != scene.position])
    pebbles: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = float(rng.uniform(1.0, 1.5))
        for keep_out in (own + extra, own):
            for _try in range(200):
                x, y = rng.uniform(r + 0.5, IMAGE_SIZE - r - 0.5, size=2)
                if _clear(x, y, r, keep_out) and _clear(x, y, r, pebbles, gap=1.5):
                    pebbles.append((float(x), float(y), r))
                    break
            else:
                continue
            break
    return tuple(pebbles)


# --------------------------------------------------------------------------- sampling


def sample_scene(
    rng_or_seed: np.random.Generator | int | None = None,
    avoid_positions: Sequence[str] = (),
    **fixed: str,
) -> Scene:
    """Draw a random scene; ``fixed`` pins attributes, e.g. ``sample_scene(0, colour="red")``.

    The same random numbers are drawn whatever is fixed, so ``sample_scene(s, colour="red")``
    equals ``sample_scene(s).replace(colour="red")``.  (With ``position`` fixed the pebbles may
    differ, because they are placed clear of the object's position.)  ``avoid_positions`` asks
    for pebbles clear of objects at those cells as well (for position-edit benchmarks).
    """
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise TypeError(f"unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")
    rng = as_rng(rng_or_seed)
    attrs = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": COLOURS[rng.integers(len(COLOURS))],
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }
    attrs.update(fixed)
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    scene = Scene(
        **attrs,
        jitter_x=float(jx),
        jitter_y=float(jy),
        size_u=float(rng.uniform()),
        hue_jitter=float(rng.uniform(-HUE_JITTER, HUE_JITTER)),
        saturation=float(rng.uniform(0.8, 1.0)),
        value=float(rng.uniform(0.85, 1.0)),
        angle=float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)),
        bg_colour_a=sample_background_colour(rng, BG_SATURATION, BG_VALUE),
        bg_colour_b=sample_background_colour(rng, BG_SATURATION, BG_VALUE),
        bg_angle=float(rng.uniform(0.0, 360.0)),
        noise_seed=int(rng.integers(2**31)),
        noise_amplitude=float(rng.uniform(2.0, 4.0)),
        pebble_colour=sample_pebble_colour(rng),
    )
    n_pebbles = int(rng.integers(1, 4))
    pebble_rng = np.random.default_rng(int(rng.integers(2**31)))
    pebbles = _place_pebbles(scene, pebble_rng, n_pebbles, avoid_positions)
    return scene.replace(pebbles=pebbles)


# --------------------------------------------------------------------------- rendering


def _background(scene: Scene) -> np.ndarray:
    """Linear gradient plus pebbles, float32 (32, 32, 3) in 0..255, without noise."""
    t = gradient(IMAGE_SIZE, scene.bg_angle)
    a = np.asarray(scene.bg_colour_a, dtype=np.float32) * 255
    b = np.asarray(scene.bg_colour_b, dtype=np.float32) * 255
    img = a + (b - a) * t[..., None]
    if scene.pebbles:
        cov = _pebble_coverage(scene)[..., None]
        img = img * (1 - cov) + np.asarray(scene.pebble_colour, dtype=np.float32) * 255 * cov
    return img


def _finish(scene: Scene, img: np.ndarray) -> np.ndarray:
    """Add the scene's per-pixel noise and quantise to uint8."""
    noise_rng = np.random.default_rng(scene.noise_seed)
    amp = scene.noise_amplitude
    img = img + noise_rng.uniform(-amp, amp, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _paint(img: np.ndarray, scene: Scene) -> np.ndarray:
    cov = object_coverage(scene)[..., None]
    return img * (1 - cov) + np.asarray(scene.rgb, dtype=np.float32) * 255 * cov


def render(scene: Scene) -> np.ndarray:
    """Render the scene as a deterministic uint8 array of shape (32, 32, 3)."""
    return _finish(scene, _paint(_background(scene), scene))


def render_background(scene: Scene) -> np.ndarray:
    """The scene's background (gradient, pebbles, noise) without the object, uint8 (32, 32, 3)."""
    return _finish(scene, _background(scene))


def render_many(scenes: Sequence[Scene]) -> np.ndarray:
    """Draw the objects of all ``scenes`` on the first scene's background (for count tests)."""
    if not scenes:
        raise ValueError("render_many needs at least one scene")
    img = _background(scenes[0])
    for scene in scenes:
        img = _paint(img, scene)
    return _finish(scenes[0], img)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Render several scenes into one uint8 array (N, 32, 32, 3)."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene)
    return out


# --------------------------------------------------------------------------- captions


def caption(
    scene: Scene | dict[str, str],
    rng: np.random.Generator | None = None,
    template: int | str | None = None,
) -> str:
    """Describe the scene with one of :data:`TEMPLATES`.

    ``template`` may be an index into TEMPLATES or a format string; otherwise ``rng`` picks one
    at random, and with neither the first template is used.
    """
    attrs = scene.attributes if isinstance(scene, Scene) else scene
    if template is None:
        template = int(rng.integers(len(TEMPLATES))) if rng is not None else 0
    if isinstance(template, int):
        template = TEMPLATES[template]
    return template.format(**attrs)


def parse_caption(text: str) -> dict[str, str | None]:
    """Read the attributes back from a caption; missing attributes are None.

    Two-word positions ("top left") are matched before one-word ones ("top", "left").
    """
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str | None] = {
        "shape": next((w for w in words if w in SHAPES), None),
        "colour": next((w for w in words if w in COLOURS), None),
        "size": next((w for w in words if w in SIZES), None),
        "position": None,
    }
    pairs = [" ".join(p) for p in zip(words, words[1:])]
    two_word = [p for p in POSITIONS if " " in p]
    found["position"] = next((p for p in pairs if p in two_word), None)
    if found["position"] is None:
        found["position"] = next((w for w in words if w in POSITIONS), None)
    return found


def random_caption_and_scene(rng: np.random.Generator | int | None = None) -> tuple[Scene, str]:
    """A random scene and a randomly phrased caption of it (training-data convenience)."""
    rng = as_rng(rng)
    scene = sample_scene(rng)
    return scene, caption(scene, rng=rng)


# The example images shipped in the package (scripts/make_examples.py renders them; the
# repository's examples/ links here): file name -> (seed, attributes) of the scene, so an edit
# of one can be scored against it.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLES: dict[str, tuple[int, dict]] = {
    "large-red-circle-top-left": (
        3, dict(shape="circle", colour="red", size="large", position="top left")),
    "small-yellow-square-center": (
        7, dict(shape="square", colour="yellow", size="small", position="center")),
    "large-green-triangle-bottom-right": (
        11, dict(shape="triangle", colour="green", size="large", position="bottom right")),
}
