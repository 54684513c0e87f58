"""ShapesWorld: procedural 32x32 images of coloured shapes with captions and exact detectors.

A tiny, fully known world in which text-guided editing can be trained quickly on a CPU and
scored exactly: every image comes from a :class:`Scene` whose attributes (shape, colour, size,
position) are known, and :func:`detect` reads those attributes back from any image.
"""

from .detect import Detection, attributes_of, compare, detect, label_components
from .world import (
    ATTRIBUTES,
    COLOUR_HUES,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    VOCABULARY,
    Scene,
    caption,
    object_coverage,
    object_mask,
    parse_caption,
    pebble_mask,
    pebbles_clear_of,
    random_caption_and_scene,
    render,
    render_background,
    render_batch,
    render_many,
    sample_scene,
)

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "COLOUR_HUES",
    "Detection",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "TEMPLATES",
    "VOCABULARY",
    "attributes_of",
    "caption",
    "compare",
    "detect",
    "label_components",
    "object_coverage",
    "object_mask",
    "parse_caption",
    "pebble_mask",
    "pebbles_clear_of",
    "random_caption_and_scene",
    "render",
    "render_background",
    "render_batch",
    "render_many",
    "sample_scene",
]
