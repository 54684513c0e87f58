"""Tests for ShapesWorld 2: renderer, edits, captions, the analytic detectors and identity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagic.shapes2 import (
    ATTRIBUTES,
    COLOURS,
    KINDS,
    MARKINGS,
    POSES,
    POSITIONS,
    PREFIXES,
    SIZES,
    VOCABULARY,
    Scene,
    Thing,
    add_thing,
    caption,
    compare,
    detect,
    dilate,
    edit_thing,
    find_pebbles,
    identity_changes,
    identity_distance,
    marking_coverage,
    match_pebbles,
    object_band,
    parse_caption,
    pebble_mask,
    random_caption_and_scene,
    remove_thing,
    render,
    render_background,
    render_batch,
    same_identity,
    sample_scene,
    sample_thing,
    sample_thing_for,
    thing_box,
    thing_coverage,
    thing_masks,
)
from imagic.shapes2.detect import IDENTITY_THRESHOLD, Identity
from imagic.shapes2.world import SLOT_MARGIN, SLOT_WIDTH

N_RENDERS = 2000  # the detector bar: >= 99% of every attribute on this many renders
N_PAIRS = 1000  # the identity bar: >= 99% of this many pairs of each kind


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [sample_scene(1000 + i) for i in range(N_RENDERS)]


@pytest.fixture(scope="module")
def images(scenes: list[Scene]) -> np.ndarray:
    return render_batch(scenes)


@pytest.fixture(scope="module")
def detections(images: np.ndarray) -> list:
    return [detect(image) for image in images]


_BACKDROP = sample_scene(0, count=1)


def _alone(thing: Thing) -> Scene:
    """``thing`` alone on one fixed background (renders then reuse the cached background; the
    source was read on its own background, so the pairs also show identity ignores it)."""
    return _BACKDROP.replace(things=(thing,))


def _read(scene: Scene, position: str):
    found = detect(render(scene)).at(position)
    assert found is not None
    return found


def _same_caption_other(thing: Thing, seed: int) -> Thing:
    """Another object with ``thing``'s caption (kind, pose, colour, size, position)."""
    fixed = {a: getattr(thing, a) for a in ("kind", "colour", "size")}
    if thing.pose is not None:
        fixed["pose"] = thing.pose
    return sample_thing(seed, position=thing.position, **fixed)


# --------------------------------------------------------------------------- rendering


def test_render_is_deterministic_uint8_128() -> None:
    a, b = render(sample_scene(7)), render(sample_scene(7))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(sample_scene(8)))
    assert sample_scene(np.random.default_rng(3)) == sample_scene(np.random.default_rng(3))
    rng = np.random.default_rng(3)
    assert sample_scene(rng) != sample_scene(rng)  # the generator advances


def test_render_batch_matches_render(scenes: list[Scene], images: np.ndarray) -> None:
    assert images.shape == (N_RENDERS, 128, 128, 3) and images.dtype == np.uint8
    for i in (0, 17, N_RENDERS - 1):
        assert np.array_equal(images[i], render(scenes[i]))


def test_every_value_occurs(scenes: list[Scene]) -> None:
    things = [t for s in scenes for t in s.things]
    for name, values in zip(ATTRIBUTES, (KINDS, POSES, COLOURS, SIZES, POSITIONS)):
        seen = {getattr(t, name) for t in things}
        assert seen - {None} == set(values), name
    assert {len(s.things) for s in scenes} == {1, 2, 3}
    assert {t.marking for t in things} == set(MARKINGS)
    assert {len(t.marks) for t in things} == {1, 2, 3}
    assert {t.facing for t in things} == {1, -1}
    assert {t.pose for t in things if t.kind != "cat"} == {None}


def test_objects_stay_in_their_slot_and_band_in_every_pose(scenes: list[Scene]) -> None:
    """Every object, in every pose and every slot, stays inside its slot (so edits of one object
    never touch another) and inside the object band (so they never touch a pebble)."""
    for scene in scenes[:150]:
        top, bottom = object_band(scene.ground)
        for thing in scene.things:
            variants = [thing.replace(position=p) for p in POSITIONS]
            if thing.kind == "cat":
                variants += [thing.replace(pose=p) for p in POSES]
            for v in variants:
                x0, x1, y0, y1 = thing_box(v, scene.ground)
                lo = POSITIONS.index(v.position) * SLOT_WIDTH
                assert lo + SLOT_MARGIN - 1e-6 <= x0 and x1 <= lo + SLOT_WIDTH - SLOT_MARGIN + 1e-6
                assert top <= y0 and y1 <= bottom
                ys, xs = np.nonzero(thing_coverage(v, scene.ground))
                assert xs.min() >= math.floor(x0) and xs.max() < math.ceil(x1)
        rows = np.nonzero(pebble_mask(scene).any(axis=1))[0]
        assert len(scene.pebbles) >= 3
        assert not ((rows >= top) & (rows < bottom)).any()


def test_objects_are_saturated_and_background_muted(scenes: list[Scene], images: np.ndarray):
    for scene, image in list(zip(scenes, images))[:40]:
        chroma = image.max(axis=-1).astype(int) - image.min(axis=-1)
        inside = np.zeros((128, 128), dtype=bool)
        touched = np.zeros((128, 128), dtype=bool)
        for thing in scene.things:
            cov = thing_coverage(thing, scene.ground)
            inside |= cov > 0.99
            touched |= cov > 0
        assert chroma[inside].min() > 60  # the darkest marking included
        assert chroma[~touched].max() < 40


def test_a_pose_changes_the_outline_not_the_markings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pose is non-rigid: the cat's box changes shape between poses, while its markings (on
    the body, which a pose only turns) keep their area.  Sampled finely here, so that pixel
    quantisation does not hide the geometry."""
    import imagic.shapes2.world as world

    monkeypatch.setattr(world, "SUPERSAMPLE", 16)
    for seed in range(30):
        cat = sample_thing(seed, position="middle", kind="cat")
        aspects, marked = {}, {}
        for pose in POSES:
            posed = cat.replace(pose=pose)
            x0, x1, y0, y1 = thing_box(posed, 94.0)
            aspects[pose] = (x1 - x0) / (y1 - y0)
            marked[pose] = float(marking_coverage(posed, 94.0).sum())
        assert aspects["sitting"] < 0.8 < aspects["standing"] < 1.3 < aspects["lying"]
        assert max(marked.values()) <= 1.02 * min(marked.values())


# --------------------------------------------------------------------------- sampling and edits


def test_fixed_attributes_equal_replace() -> None:
    for seed in range(20):
        thing = sample_thing(seed)
        assert sample_thing(seed, colour="blue") == thing.replace(colour="blue")
        assert sample_thing(seed, size="large") == thing.replace(size="large")
        cat = sample_thing(seed, kind="cat")
        assert sample_thing(seed, kind="cat", pose="lying") == cat.replace(pose="lying")
    with pytest.raises(TypeError):
        sample_thing(0, marking="stripes")


def test_scenes_of_one_seed_share_objects_and_background() -> None:
    """Each slot's object comes from its own seed: removing an object equals sampling the
    scene without it."""
    for seed in range(20):
        full = sample_scene(seed, count=3)
        for position in POSITIONS:
            rest = [{"position": p} for p in POSITIONS if p != position]
            assert remove_thing(full, position) == sample_scene(seed, specs=rest)


def _check_edit(before: Scene, after: Scene, changed: list[str]) -> None:
    """Pixels outside the edited objects' before/after coverage are identical, every other
    object is identical and reads the same identity, the pebbles are where they were, and the
    edited scene reads as intended."""
    img_before, img_after = render(before), render(after)
    touched = np.zeros((128, 128), dtype=bool)
    for scene in (before, after):
        for thing in scene.things:
            if thing.position in changed:
                touched |= thing_coverage(thing, scene.ground) > 0
    assert np.array_equal(img_before[~touched], img_after[~touched])
    assert not np.array_equal(img_before, img_after)
    for field in Scene.__dataclass_fields__:
        if field != "things":
            assert getattr(before, field) == getattr(after, field)
    kept = [t for t in before.things if t.position not in changed]
    assert kept == [t for t in after.things if t.position not in changed]
    found_before, found_after = detect(img_before), detect(img_after)
    for thing in kept:
        a, b = found_before.at(thing.position), found_after.at(thing.position)
        assert identity_distance(a, b) == 0.0
    assert compare(found_after, after)["all"]
    pebbles = find_pebbles(img_after, dilate(dilate(found_after.mask)))
    assert match_pebbles([(x, y) for x, y, _ in before.pebbles], pebbles) == (
        len(before.pebbles), 0)


def test_pose_edit_keeps_everything_else() -> None:
    for seed in range(25):
        scene = sample_scene(seed, specs=[{"kind": "cat"}, {}])
        cat = next(t for t in scene.things if t.kind == "cat")
        new_pose = POSES[(POSES.index(cat.pose) + 1 + seed % 2) % 3]
        edited = edit_thing(scene, cat.position, pose=new_pose)
        assert edited.thing_at(cat.position) == cat.replace(pose=new_pose)
        _check_edit(scene, edited, [cat.position])


def test_colour_edit_keeps_everything_else_and_the_identity() -> None:
    for seed in range(25):
        scene = sample_scene(100 + seed)
        thing = scene.things[seed % len(scene.things)]
        colour = COLOURS[(COLOURS.index(thing.colour) + 1 + seed % 4) % len(COLOURS)]
        edited = edit_thing(scene, thing.position, colour=colour)
        _check_edit(scene, edited, [thing.position])
        # The hue offset inside the colour's band is kept, so the identity is too.
        assert same_identity(_read(scene, thing.position), _read(edited, thing.position))


def test_position_edit_keeps_everything_else() -> None:
    for seed in range(25):
        scene = sample_scene(200 + seed, count=1 + seed % 2)
        thing = scene.things[0]
        target = scene.free_positions[seed % len(scene.free_positions)]
        edited = edit_thing(scene, thing.position, position=target)
        assert edited.thing_at(target) == thing.replace(position=target)
        _check_edit(scene, edited, [thing.position, target])
        assert same_identity(_read(scene, thing.position), _read(edited, target))


def test_add_and_remove_keep_everything_else() -> None:
    for seed in range(25):
        scene = sample_scene(300 + seed, count=1 + seed % 2)
        new = sample_thing_for(scene, 10_000 + seed)
        added = add_thing(scene, new)
        assert len(added.things) == len(scene.things) + 1 and added.thing_at(new.position) == new
        _check_edit(scene, added, [new.position])
        removed = remove_thing(added, new.position)
        assert removed == scene
        _check_edit(added, removed, [new.position])


def test_invalid_edits_are_refused() -> None:
    scene = sample_scene(5, count=3)
    left = scene.thing_at("left")
    with pytest.raises(ValueError):
        edit_thing(scene, "left", position="right")  # taken
    with pytest.raises(ValueError):
        add_thing(scene, left.replace(position="middle"))  # taken
    with pytest.raises(ValueError):
        sample_thing_for(scene, 1)  # no free slot
    single = sample_scene(5, count=1)
    with pytest.raises(ValueError):
        remove_thing(single, single.things[0].position)  # a scene keeps one object
    with pytest.raises(KeyError):
        remove_thing(single, next(p for p in POSITIONS if p != single.things[0].position))
    with pytest.raises(ValueError):
        Thing(kind="square", colour="red", size="small", position="left", pose="sitting")
    with pytest.raises(ValueError):
        Thing(kind="cat", colour="red", size="small", position="left")  # a cat needs a pose
    with pytest.raises(ValueError):
        edit_thing(scene, "left", colour="magenta")


# --------------------------------------------------------------------------- captions


def test_captions_round_trip_and_use_the_vocabulary(scenes: list[Scene]) -> None:
    vocabulary = set(VOCABULARY)
    assert sorted(vocabulary) == VOCABULARY
    for scene in scenes[:100]:
        for index in range(len(PREFIXES)):
            text = caption(scene, prefix=index)
            assert parse_caption(text) == scene.attributes
            assert set(text.split()) <= vocabulary


def test_caption_grammar() -> None:
    scene = sample_scene(0, specs=[
        {"kind": "cat", "pose": "sitting", "colour": "red", "size": "large", "position": "left"},
        {"kind": "square", "colour": "blue", "size": "small", "position": "right"},
    ])
    assert caption(scene) == (
        "a large red cat sitting on the left and a small blue square on the right")
    assert caption(scene, prefix=1).startswith("a photo of a large red cat")
    rng = np.random.default_rng(0)
    assert len({caption(scene, rng=rng) for _ in range(60)}) == len(PREFIXES)
    assert parse_caption("a red cat and a square in the middle") == [
        {"kind": "cat", "pose": None, "colour": "red", "size": None, "position": None},
        {"kind": "square", "pose": None, "colour": None, "size": None, "position": "middle"},
    ]
    scene, text = random_caption_and_scene(4)
    assert parse_caption(text) == scene.attributes


# --------------------------------------------------------------------------- detection


def test_detector_accuracy_on_2000_renders(scenes: list[Scene], detections: list) -> None:
    right = {a: 0 for a in ATTRIBUTES}
    total = count = 0
    for scene, found in zip(scenes, detections):
        verdict = compare(found, scene)
        count += verdict["count"]
        for per_thing in verdict["things"]:
            total += 1
            for a in ATTRIBUTES:
                right[a] += per_thing[a]
    accuracy = {a: right[a] / total for a in ATTRIBUTES}
    assert count / len(scenes) >= 0.99
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def test_detector_masks_match_the_truth(scenes: list[Scene], detections: list) -> None:
    for scene, found in list(zip(scenes, detections))[:100]:
        for thing, truth in zip(scene.things, thing_masks(scene)):
            mask = found.at(thing.position).mask
            assert (mask & truth).sum() / (mask | truth).sum() > 0.8


def test_compare_handles_partial_captions_and_misses(scenes: list[Scene], detections: list):
    scene, found = scenes[0], detections[0]
    assert compare(found, scene)["all"]
    wanted = parse_caption(caption(scene))
    for attrs in wanted:
        attrs["size"] = None  # a caption that leaves the size out
    verdict = compare(found, wanted)
    assert verdict["all"] and all("size" not in t for t in verdict["things"])
    wrong = [dict(a, colour=COLOURS[(COLOURS.index(a["colour"]) + 1) % 5]) for a in wanted]
    assert not compare(found, wrong)["all"]
    assert compare(detect(render_background(scene)), scene) == {
        "count": False,
        "things": [dict.fromkeys(t, False) for t in compare(found, scene)["things"]],
        "all": False,
    }


def test_no_object_on_bare_backgrounds(scenes: list[Scene]) -> None:
    for scene in scenes[:50]:
        found = detect(render_background(scene))
        assert found.count == 0 and not found.mask.any()


def test_identity_readings_match_the_truth(scenes: list[Scene], detections: list) -> None:
    for scene, found in list(zip(scenes, detections))[:300]:
        for thing in scene.things:
            identity = found.at(thing.position).identity
            assert identity.marking == thing.marking and identity.marks == len(thing.marks)
            assert abs(identity.hue_offset - thing.hue_jitter) < 1.0
            assert abs(identity.saturation - thing.saturation) < 0.02
            assert abs(identity.value - thing.value) < 0.02
            assert abs(identity.shade - thing.shade) < 0.04


def _separated(same: list[float], other: list[float]) -> float:
    """Share of pairs where the same object reads as the same and the other one does not."""
    hits = [s < IDENTITY_THRESHOLD <= o for s, o in zip(same, other)]
    return sum(hits) / len(hits)


def test_identity_separates_a_reposed_cat_from_another_cat(
    scenes: list[Scene], detections: list
) -> None:
    """Same cat in a new pose vs another cat of the same caption (kind, pose, colour, size,
    position), over >= 1000 pairs: each cat of the renders re-posed, then again if needed."""
    jobs = [
        (found, thing, pose)
        for scene, found in zip(scenes, detections)
        for thing in scene.things
        if thing.kind == "cat"
        for pose in POSES
        if pose != thing.pose
    ]
    jobs = (jobs[::2] + jobs[1::2])[:N_PAIRS]  # one re-pose of every cat first
    assert len(jobs) == N_PAIRS
    same, other = [], []
    for i, (found, cat, pose) in enumerate(jobs):
        source = found.at(cat.position)
        reposed = cat.replace(pose=pose)
        again = _read(_alone(reposed), cat.position)
        assert again.pose == pose
        stranger = _read(_alone(_same_caption_other(reposed, 50_000 + i)), cat.position)
        same.append(identity_distance(source, again))
        other.append(identity_distance(again, stranger))
    assert _separated(same, other) >= 0.99


def test_identity_separates_a_moved_object_from_another_object(
    scenes: list[Scene], detections: list
) -> None:
    """Same object in a new slot vs another object of the same caption there, >= 1000 pairs."""
    jobs = [
        (scene, found, thing)
        for scene, found in zip(scenes, detections)
        for thing in scene.things
        if scene.free_positions
    ][:N_PAIRS]
    assert len(jobs) == N_PAIRS
    same, other = [], []
    for i, (scene, found, thing) in enumerate(jobs):
        target = scene.free_positions[i % len(scene.free_positions)]
        moved = thing.replace(position=target)
        again = _read(_alone(moved), target)
        stranger = _read(_alone(_same_caption_other(moved, 70_000 + i)), target)
        same.append(identity_distance(found.at(thing.position), again))
        other.append(identity_distance(again, stranger))
    assert _separated(same, other) >= 0.99


def test_identity_changes_say_what_made_another_object() -> None:
    """The words `score-edit` prints for an object that is not the same one: a changed marking
    first, then each detail moved at least half its tolerance, largest first."""
    cat = Identity(hue_offset=1.0, saturation=0.60, value=0.90, shade=0.55, marking="stripes",
                   marks=1)
    assert identity_changes(cat, cat) == []
    assert identity_changes(cat, Identity(4.0, 0.61, 0.90, 0.55, "spots", 2)) == [
        "1 stripe → 2 spots", "hue +3.0°"]
    assert identity_changes(cat, Identity(1.0, 0.55, 0.80, 0.55, "stripes", 1)) == [
        "brightness -0.10", "saturation -0.05"]
    assert identity_changes(cat, Identity(1.0, 0.60, 0.90, 0.0, None, 0)) == [
        "1 stripe → no marking", "marking shade -0.55"]


# --------------------------------------------------------------------------- pebbles


def test_pebbles_are_found_exactly_on_renders(
    scenes: list[Scene], images: np.ndarray, detections: list
) -> None:
    exact = 0
    for scene, image, found in list(zip(scenes, images, detections))[:300]:
        pebbles = find_pebbles(image, dilate(dilate(found.mask)))
        matched, added = match_pebbles([(x, y) for x, y, _ in scene.pebbles], pebbles)
        exact += matched == len(scene.pebbles) and added == 0
    assert exact >= 0.99 * 300


def test_missing_and_moved_pebbles_are_noticed() -> None:
    for seed in range(20):
        scene = sample_scene(seed)
        centres = [(x, y) for x, y, _ in scene.pebbles]
        exclude = dilate(dilate(detect(render(scene)).mask))
        assert find_pebbles(render(scene.replace(pebbles=())), exclude) == []
        x, y, r = scene.pebbles[0]
        gone = scene.replace(pebbles=scene.pebbles[1:])
        assert match_pebbles(centres, find_pebbles(render(gone), exclude)) == (
            len(centres) - 1, 0)
        x = x + 5 if x < 64 else x - 5
        if all(math.hypot(x - ox, y - oy) > 8 for ox, oy in centres[1:]):
            moved = scene.replace(pebbles=((x, y, r), *scene.pebbles[1:]))
            assert match_pebbles(centres, find_pebbles(render(moved), exclude)) == (
                len(centres) - 1, 1)


def test_the_shipped_examples_are_renders_and_score_edit_reads_their_edits(tmp_path, capsys):
    """Each ShapesWorld 2 example file is its scene's render; `imagic bench score-edit` scores
    an edit of one against the scene its edit asks for: the target scene's own render succeeds,
    the unchanged input does not, and an edit that asked for another text is refused."""
    import json
    from pathlib import Path

    from PIL import Image

    from imagic.cli import main
    from imagic.shapes2.world import EXAMPLES, example_scenes

    folder = Path(__file__).resolve().parent.parent / "examples"
    for name in EXAMPLES:
        source, target = example_scenes(name)
        with Image.open(folder / f"{name}.png") as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), render(source))
    source, target = example_scenes("purple-cat-standing")
    assert [t.pose for t in target.things] == ["sitting"]
    Image.fromarray(render(target)).save(tmp_path / "edited.png")
    Image.fromarray(render(source)).save(tmp_path / "unchanged.png")
    cat = target.things[0]
    other = target.replace(things=(cat.replace(hue_jitter=cat.hue_jitter + 4.0),))
    Image.fromarray(render(other)).save(tmp_path / "other.png")
    images = [{"file": "edited.png", "eta": 1.0, "seed": 0},
              {"file": "unchanged.png", "eta": 0.0, "seed": 0},
              {"file": "other.png", "eta": 1.1, "seed": 0}]
    manifest = {"image": str(folder / "purple-cat-standing.png"), "images": images,
                "text": "a large purple cat sitting on the right"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", "score-edit", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "η 1.00 seed 0: target yes, others kept yes, identity yes" in printed
    assert "η 0.00 seed 0: target no" in printed
    # another cat of the same caption: the line says what made it another
    assert ("η 1.10 seed 0: target yes, others kept yes, identity no (right object: hue +4"
            in printed)
    assert printed.strip().endswith("success (target, the rest kept, identity) 1/3")
    manifest["text"] = "a large purple cat lying on the right"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", "score-edit", str(tmp_path)]) == 2
    assert "scores purple-cat-standing's own edit" in capsys.readouterr().err
