"""The edit Imagic exists for, on the shipped ShapesWorld 2 cascade: a cat made to sit, through
both stages (the base and the super-resolution stage fine-tuned on the input), keeps being the
same cat. Held-out ShapesBench 2 case 22 at the preset's steps and training seed 0; with any one
step count halved the cat loses its identity (docs/models/shapes2.md, "Where identity is
lost"), so the preset is the shortest recipe this test can hold."""

from __future__ import annotations

from imagic import Imagic, load_backend
from imagic.bench.shapes2 import make_case
from imagic.presets import get_preset


def test_a_pose_edit_through_both_stages_keeps_the_cat_and_the_rest_of_the_scene():
    case = make_case(22, "pose", seed=1)  # held-out case 22
    standing = [t for t in case.source.things if t.pose is not None]
    sitting = [t for t in case.target.things if t.pose is not None]
    assert [t.pose for t in standing] == ["standing"] and [t.pose for t in sitting] == ["sitting"]
    backend = load_backend("imagic:shapes2-128", device="cpu")
    editor = Imagic(backend, get_preset("shapes2").with_options(seeds=(0,), etas=(0.8,)),
                    quiet=True)
    session = editor.fit(case.image(), case.text)
    [result] = editor.generate(session)
    scored = case.check(result.image)
    assert scored["target"] and scored["kept"] and scored["identity"], scored
    assert not case.check(case.image())["target"]  # the input's cat stands
