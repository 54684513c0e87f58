"""ShapesWorld 2's scores on exact renders: text-to-image accuracy reads true renders as right
and counts each attribute where a caption names it; an edit done right scores success, and each
way of getting it wrong (target missed, another attribute changed, another object in its place,
a pebble lost) is caught by its own verdict."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagic.shapes2 import (
    POSES,
    add_thing,
    edit_thing,
    remove_thing,
    render,
    sample_scene,
    sample_thing_for,
)
from imagic.shapes2.evaluate import check_edit, evaluation_captions, read_samples, tally


def image(scene) -> Image.Image:
    return Image.fromarray(render(scene))


def scene_with_a_cat(seed: int = 0):
    for s in range(seed, seed + 200):
        scene = sample_scene(s)
        cat = next((t for t in scene.things if t.kind == "cat"), None)
        if cat is not None and len(scene.things) < 3 and scene.pebbles:
            return scene, cat
    raise AssertionError("no scene with a cat, a free slot and pebbles")


@pytest.mark.parametrize("seed", [0, 7, 21])
def test_a_pose_edit_done_right_succeeds_and_the_input_itself_misses_the_target(seed):
    source, cat = scene_with_a_cat(seed)
    pose = next(p for p in POSES if p != cat.pose)
    target = edit_thing(source, cat.position, pose=pose)
    done = check_edit(image(target), source, target)
    assert done["success"] and done["pebbles"]
    missed = check_edit(image(source), source, target)
    assert not missed["target"] and missed["kept"] and missed["identity"]
    assert not missed["success"]


def test_adding_and_removing_objects_are_scored_by_the_slot():
    source, cat = scene_with_a_cat()
    free = source.free_positions[0]
    added = add_thing(source, sample_thing_for(source, 5, position=free))
    assert check_edit(image(added), source, added)["success"]
    assert not check_edit(image(source), source, added)["target"]
    removed = remove_thing(added, free)
    assert check_edit(image(removed), added, removed)["success"]
    assert not check_edit(image(added), added, removed)["target"]


def test_another_object_of_the_same_caption_is_not_the_same_object():
    source, cat = scene_with_a_cat()
    target = edit_thing(source, cat.position, pose=next(p for p in POSES if p != cat.pose))
    _, other_cat = scene_with_a_cat(100)  # another cat, given the same named attributes
    stranger = other_cat.replace(**target.thing_at(cat.position).attributes)
    impostor = target.replace(things=tuple(stranger if t.position == cat.position else t
                                           for t in target.things))
    result = check_edit(image(impostor), source, target)
    assert result["target"] and result["kept"] and not result["identity"]
    # it says what makes the cat another cat, and only for the cat
    assert list(result["identity_changes"]) == [cat.position]
    assert result["identity_changes"][cat.position]
    assert check_edit(image(target), source, target)["identity_changes"] == {}


def test_a_colour_change_of_another_object_is_not_kept():
    source, cat = scene_with_a_cat()
    free = source.free_positions[0]
    two = add_thing(source, sample_thing_for(source, 9, position=free, colour="green"))
    target = edit_thing(two, cat.position, pose=next(p for p in POSES if p != cat.pose))
    wrong = edit_thing(target, free, colour="blue")
    result = check_edit(image(wrong), two, target)
    assert result["target"] and not result["kept"]


def test_a_lost_pebble_is_caught():
    source, cat = scene_with_a_cat()
    target = edit_thing(source, cat.position, pose=next(p for p in POSES if p != cat.pose))
    without = target.replace(pebbles=target.pebbles[1:])
    result = check_edit(image(without), source, target)
    assert result["success"] and not result["pebbles"]
    assert np.isfinite(result["background_psnr"])


def test_true_renders_of_the_evaluation_captions_read_right_and_wrong_pairings_do_not():
    pairs = evaluation_captions(12, seed=0)
    images = [image(scene) for scene, _ in pairs]
    accuracy, everything = tally(pairs, read_samples(pairs, images))
    assert everything == 1.0 and set(accuracy.values()) == {1.0}
    assert set(accuracy) == {"kind", "pose", "colour", "size", "position", "count"}
    _, shifted = tally(pairs, read_samples(pairs, images[1:] + images[:1]))
    assert shifted < 0.5


def test_pose_accuracy_counts_only_the_objects_with_a_pose():
    pairs = [p for p in evaluation_captions(60, seed=0)
             if sorted(t.kind == "cat" for t in p[0].things) == [False, True]][:1]
    assert pairs, "no caption with one cat and one rigid shape"
    scene, _ = pairs[0]
    # the cat's pose read wrong, the rigid shape's (no pose) read right: pose is 0 of 1, not 1 of 2
    readings = [{a: a != "pose" or thing.kind != "cat"
                 for a in ("kind", "pose", "colour", "size", "position")} for thing in scene.things]
    accuracy, everything = tally(pairs, [{"count": True, "things": readings, "all": False}])
    assert accuracy["pose"] == 0.0 and accuracy["kind"] == 1.0 and everything == 0.0
