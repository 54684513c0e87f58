"""Tests for ShapesWorld: renderer, scene editing, captions and the analytic detectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagic.shapes import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    VOCABULARY,
    Scene,
    caption,
    compare,
    detect,
    find_pebbles,
    label_components,
    match_pebbles,
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
from imagic.shapes.detect import dilate
from imagic.shapes.world import CELL, SHAPE_AREA_FACTOR, SIZE_RADII


def _noisy(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _accuracy(scenes: list[Scene], images: np.ndarray) -> dict[str, float]:
    hits = {a: 0 for a in ATTRIBUTES}
    for scene, image in zip(scenes, images):
        result = compare(detect(image), scene)
        for a in ATTRIBUTES:
            hits[a] += result[a]
    return {a: hits[a] / len(scenes) for a in ATTRIBUTES}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [sample_scene(1000 + i) for i in range(300)]


@pytest.fixture(scope="module")
def images(scenes: list[Scene]) -> np.ndarray:
    return render_batch(scenes)


# --------------------------------------------------------------------------- rendering


def test_render_is_deterministic_uint8_32x32() -> None:
    a, b = render(sample_scene(7)), render(sample_scene(7))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(sample_scene(8)))


def test_sample_scene_accepts_generator_and_is_reproducible() -> None:
    s1 = sample_scene(np.random.default_rng(3))
    s2 = sample_scene(np.random.default_rng(3))
    assert s1 == s2
    rng = np.random.default_rng(3)
    assert sample_scene(rng) != sample_scene(rng)  # the generator advances


def test_render_batch_matches_render(scenes: list[Scene], images: np.ndarray) -> None:
    assert images.shape == (len(scenes), 32, 32, 3) and images.dtype == np.uint8
    for i in (0, 17, 299):
        assert np.array_equal(images[i], render(scenes[i]))


def test_all_attribute_values_occur(scenes: list[Scene]) -> None:
    for name, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, POSITIONS)):
        assert {getattr(s, name) for s in scenes} == set(values)


def test_objects_stay_inside_image_and_their_cell() -> None:
    """Large objects in corner cells are the tight case: none may be clipped by the border."""
    for i, position in enumerate(POSITIONS):
        for shape in SHAPES:
            for size in SIZES:
                scene = sample_scene(i, shape=shape, size=size, position=position)
                expected = SHAPE_AREA_FACTOR[shape] * scene.radius**2
                assert object_coverage(scene).sum() == pytest.approx(expected, rel=0.02)
                cx, cy = scene.centre
                assert POSITIONS[3 * int(cy // CELL) + int(cx // CELL)] == position


def test_sizes_are_separated() -> None:
    lo_small, hi_small = SIZE_RADII["small"]
    lo_large, hi_large = SIZE_RADII["large"]
    assert hi_small < lo_large
    for seed in range(50):
        scene = sample_scene(seed)
        lo, hi = SIZE_RADII[scene.size]
        assert lo <= scene.radius <= hi


def test_object_is_saturated_and_background_muted(scenes: list[Scene], images: np.ndarray) -> None:
    for scene, image in list(zip(scenes, images))[:40]:
        chroma = image.max(axis=-1).astype(int) - image.min(axis=-1)
        inside = object_coverage(scene) > 0.99
        outside = object_coverage(scene) == 0
        assert chroma[inside].min() > 150
        assert chroma[outside].max() < 70


def test_pebbles_present_dark_and_clear_of_object(scenes: list[Scene]) -> None:
    for scene in scenes[:60]:
        assert 1 <= len(scene.pebbles) <= 3
        assert pebble_mask(scene).any()
        # Dark: every pebble pixel is darker than the same pixel without pebbles.
        with_pebbles = render_background(scene).astype(int).sum(axis=-1)
        without = render_background(scene.replace(pebbles=())).astype(int).sum(axis=-1)
        assert (with_pebbles < without - 30)[pebble_mask(scene)].all()
        # Clear of the object for every shape and size at this position.
        assert pebbles_clear_of(scene)
        for shape in SHAPES:
            for size in SIZES:
                edited = scene.replace(shape=shape, size=size)
                assert not (object_coverage(edited) > 0)[pebble_mask(scene)].any()


# --------------------------------------------------------------------------- editing


@pytest.mark.parametrize(
    "change",
    [{"colour": "blue"}, {"shape": "triangle"}, {"size": "large"}, {"position": "bottom right"}],
)
def test_replace_changes_only_that_attribute(change: dict[str, str]) -> None:
    checked = 0
    for seed in range(60):
        original = sample_scene(seed)
        ((name, value),) = change.items()
        if getattr(original, name) == value:
            continue
        edited = original.replace(**change)
        assert getattr(edited, name) == value
        for field in Scene.__dataclass_fields__:
            if field != name:
                assert getattr(edited, field) == getattr(original, field)

        before, after = render(original), render(edited)
        touched = (object_coverage(original) > 0) | (object_coverage(edited) > 0)
        assert np.array_equal(before[~touched], after[~touched])  # background bit-identical
        assert not np.array_equal(before, after)
        assert np.array_equal(pebble_mask(original), pebble_mask(edited))
        pebbles = pebble_mask(original) & ~touched
        assert np.array_equal(before[pebbles], after[pebbles])
        checked += 1
    assert checked >= 20


def test_replace_rederives_geometry() -> None:
    scene = sample_scene(11, size="small", position="top left")
    moved = scene.replace(position="center")
    assert math.dist(moved.centre, (16.0, 16.0)) <= math.sqrt(2) + 1e-9  # jitter <= 1 px/axis
    assert moved.radius == scene.radius
    grown = scene.replace(size="large")
    assert grown.radius > SIZE_RADII["small"][1]
    lo, hi = SIZE_RADII["large"]
    assert grown.radius == pytest.approx(lo + (hi - lo) * scene.size_u)
    with pytest.raises(ValueError):
        scene.replace(colour="magenta")


def test_sample_scene_with_fixed_attribute_equals_replace() -> None:
    for seed in range(10):
        assert sample_scene(seed, colour="green") == sample_scene(seed).replace(colour="green")
        assert sample_scene(seed, shape="square", size="small") == sample_scene(seed).replace(
            shape="square", size="small"
        )
    with pytest.raises(TypeError):
        sample_scene(0, texture="stripes")


def test_avoid_positions_keeps_pebbles_clear_of_position_edit() -> None:
    for seed in range(20):
        scene = sample_scene(seed, position="top left", avoid_positions=["bottom right"])
        assert pebbles_clear_of(scene, ["top left", "bottom right"])
        edited = scene.replace(position="bottom right")
        assert not (object_coverage(edited) > 0)[pebble_mask(scene)].any()


# --------------------------------------------------------------------------- captions


def test_captions_round_trip_for_every_template() -> None:
    vocabulary = set(VOCABULARY)
    assert sorted(vocabulary) == VOCABULARY
    for seed in range(60):
        scene = sample_scene(seed)
        for index in range(len(TEMPLATES)):
            text = caption(scene, template=index)
            assert parse_caption(text) == scene.attributes
            assert set(text.split()) <= vocabulary


def test_caption_defaults_and_randomness() -> None:
    scene = sample_scene(0, shape="circle", colour="red", size="small", position="center")
    assert caption(scene) == "a small red circle at the center"
    rng = np.random.default_rng(0)
    phrasings = {caption(scene, rng=rng) for _ in range(50)}
    assert len(phrasings) == len(TEMPLATES)


def test_every_position_parses_including_two_word_ones() -> None:
    for position in POSITIONS:
        attrs = {"shape": "square", "colour": "blue", "size": "large", "position": position}
        assert parse_caption(caption(attrs))["position"] == position


def test_parse_caption_missing_attributes_are_none() -> None:
    assert parse_caption("a red circle") == {
        "shape": "circle", "colour": "red", "size": None, "position": None,
    }  # fmt: skip
    assert parse_caption("something at the Top Right.")["position"] == "top right"


def test_random_caption_and_scene_agree() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene, text = random_caption_and_scene(rng)
        assert parse_caption(text) == scene.attributes


# --------------------------------------------------------------------------- detection


def test_label_components_counts_8_connected_blobs() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 4:6] = True
    labels, n = label_components(mask)
    assert n == 2
    assert labels[0, 0] == labels[1, 1] != labels[5, 5]
    assert (labels > 0).sum() == 6


def test_detector_accuracy_on_renders(scenes: list[Scene], images: np.ndarray) -> None:
    accuracy = _accuracy(scenes, images)
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def test_detector_mask_matches_ground_truth(scenes: list[Scene], images: np.ndarray) -> None:
    for scene, image in list(zip(scenes, images))[:50]:
        found, truth = detect(image).mask, object_mask(scene)
        iou = (found & truth).sum() / (found | truth).sum()
        assert iou > 0.85


def test_detector_robust_to_mild_noise(scenes: list[Scene], images: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noisy = np.stack([_noisy(image, 8.0, rng) for image in images])
    accuracy = _accuracy(scenes, noisy)
    assert all(v >= 0.97 for v in accuracy.values()), accuracy


def test_no_object_on_backgrounds(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(1)
    for scene in scenes[:100]:
        for image in (render_background(scene), _noisy(render_background(scene), 8.0, rng)):
            result = detect(image)
            assert result.status == "no object" and result.count == 0
            assert result.shape is None and not result.mask.any()


def test_several_objects_on_two_object_images() -> None:
    for seed in range(60):
        first = sample_scene(seed, position="top left")
        second = sample_scene(seed + 500, position="bottom right")
        result = detect(render_many([first, second]))
        assert result.status == "several objects" and result.count >= 2
        assert result.shape is None
    single = sample_scene(3)
    assert np.array_equal(render_many([single]), render(single))


def _pebble_centres(scene: Scene) -> list[tuple[float, float]]:
    return [(x, y) for x, y, _ in scene.pebbles]


def test_pebble_detector_finds_exactly_the_pebbles_on_renders(
    scenes: list[Scene], images: np.ndarray
) -> None:
    exact = 0
    for scene, image in zip(scenes, images):
        found = find_pebbles(image, dilate(object_mask(scene)))
        matched, added = match_pebbles(_pebble_centres(scene), found)
        exact += matched == len(scene.pebbles) and added == 0
    assert exact >= 0.99 * len(scenes)


def test_pebble_detector_sees_missing_moved_and_noisy_pebbles() -> None:
    rng = np.random.default_rng(2)
    moved_checked = 0
    for seed in range(40):
        scene = sample_scene(seed)
        centres, mask = _pebble_centres(scene), dilate(object_mask(scene))
        # none on the bare gradient, even with noise heavier than the world's
        assert find_pebbles(_noisy(render(scene.replace(pebbles=())), 6.0, rng), mask) == []
        # all of them through mild noise
        found = find_pebbles(_noisy(render(scene), 6.0, rng), mask)
        assert match_pebbles(centres, found) == (len(centres), 0)
        # one moved by 3 px (to a free place): it is not kept, and it counts as a new pebble
        x, y, r = scene.pebbles[0]
        x = x + 3 if x < 16 else x - 3
        moved = scene.replace(pebbles=((x, y, r), *scene.pebbles[1:]))
        if any(math.hypot(x - ox, y - oy) < 4 for ox, oy in centres[1:]) or \
                not pebbles_clear_of(moved):
            continue
        found = find_pebbles(render(moved), dilate(object_mask(moved)))
        assert match_pebbles(centres, found) == (len(centres) - 1, 1)
        moved_checked += 1
    assert moved_checked >= 25


def test_edit_check_keeps_pebbles_of_the_input_only() -> None:
    from PIL import Image

    from imagic.shapes.evaluate import check_edit

    for seed in range(10):
        source = sample_scene(seed, colour="red")
        target = source.replace(colour="blue")  # the ideal colour edit: same background
        c = check_edit(Image.fromarray(render(target)), source, {"colour": "blue"})
        assert c["target"] and c["kept"] and c["pebbles"], c
        assert c["pebbles_found"] == c["pebbles_expected"] >= 1 and c["pebbles_added"] == 0
        bare = check_edit(Image.fromarray(render(target.replace(pebbles=()))), source,
                          {"colour": "blue"})
        assert not bare["pebbles"] and bare["pebbles_found"] == 0
        extra = target.replace(pebbles=(*target.pebbles, (16.0, 16.0, 1.3)))
        if pebbles_clear_of(extra) and all(math.hypot(16 - x, 16 - y) > 4
                                           for x, y, _ in target.pebbles):
            c = check_edit(Image.fromarray(render(extra)), source, {"colour": "blue"})
            assert not c["pebbles"] and c["pebbles_added"] == 1


def test_pebble_detector_ignores_the_object() -> None:
    for colour in COLOURS:  # dark blue or purple objects are not pebbles
        scene = sample_scene(5, colour=colour)
        found = find_pebbles(render(scene), dilate(object_mask(scene)))
        assert match_pebbles(_pebble_centres(scene), found)[1] == 0


def test_compare_handles_dicts_and_failed_detections() -> None:
    scene = sample_scene(4)
    result = detect(render(scene))
    assert compare(result, scene) == {a: True for a in ATTRIBUTES}
    assert compare(result, {"colour": scene.colour}) == {"colour": True}
    empty = detect(render_background(scene))
    assert compare(empty, scene) == {a: False for a in ATTRIBUTES}
    with pytest.raises(ValueError):
        detect(np.zeros((16, 16, 3), dtype=np.uint8))


def test_the_shipped_examples_are_renders_of_their_recorded_scenes() -> None:
    """`imagic bench score-edit` scores an edit of examples/NAME.png against the scene recorded
    in EXAMPLES: each file must be that scene's render, enlarged 4× without new pixels."""
    from pathlib import Path

    from PIL import Image

    from imagic.shapes.world import EXAMPLES
    from imagic.shapes2.world import EXAMPLES as EXAMPLES2

    folder = Path(__file__).resolve().parent.parent / "examples"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(EXAMPLES | EXAMPLES2)
    for name, (seed, attributes) in EXAMPLES.items():
        with Image.open(folder / f"{name}.png") as image:
            small = np.asarray(image.convert("RGB"))[::4, ::4]
        np.testing.assert_array_equal(small, render(sample_scene(seed, **attributes)))

