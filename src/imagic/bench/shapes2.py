"""ShapesBench 2: the edits Imagic exists for, on ShapesWorld 2, run by ShapesBench's runner
(`bench/shapes.py`: the methods, resuming, the summary and the plot).

Each case is a 128 px render and the caption of the same scene with one edit: a colour, a
position, a cat's pose, an object added or one removed (`edit_thing`, `add_thing`,
`remove_thing`). An output succeeds when what changed reads as asked, every other named
attribute and the object count read as in the input, and every object that stays is still the
same object by its unnamed details (`shapes2.evaluate.check_edit`); the input's pebbles and the
background's PSNR and SSIM outside the objects say what else was kept.

Cases come in two sets from different seeds: the tuning set (seed 0), on which presets and
settings may be chosen, and the held-out set (seed 1), which reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputError
from ..shapes2.evaluate import check_edit
from ..shapes2.world import (
    COLOURS,
    POSES,
    Scene,
    add_thing,
    caption,
    edit_thing,
    example_scenes,
    parse_caption,
    remove_thing,
    render,
    sample_scene,
    sample_thing_for,
)
from .shapes import FIELDS, METHODS

KINDS = ("colour", "position", "pose", "add", "remove")
# the fine-tuned super-resolution stage against the stage left as trained (issue 19's question)
METHODS2 = (*METHODS, "no-sr-finetune")
SEEDS = {"tune": 0, "held-out": 1}  # the case sets


@dataclass(frozen=True)
class Case2:
    index: int
    kind: str
    source: Scene  # the input, a render (never a model sample)
    target: Scene  # the scene the text describes: the source with one edit

    fields = (*FIELDS, "identity")

    @property
    def text(self) -> str:
        return caption(self.target, prefix=0)

    def image(self) -> Image.Image:
        return Image.fromarray(render(self.source))

    def check(self, image: Image.Image) -> dict:
        c = check_edit(image, self.source, self.target)
        return {"success": int(c["success"]), "target": int(c["target"]), "kept": int(c["kept"]),
                "pebbles": int(c["pebbles"]), "psnr": round(float(c["background_psnr"]), 3),
                "ssim": round(c["background_ssim"], 4), "status": f"{c['objects']} objects",
                "identity": int(c["identity"])}


def make_case(index: int, kind: str, seed: int) -> Case2:
    """Case `index`, drawn from its own generator: scenes are drawn until one allows the edit
    (a cat for a pose, a free slot to move or add to, two objects to remove one of)."""
    rng = np.random.default_rng([seed, index])
    while True:
        scene = sample_scene(rng)
        things, free = scene.things, scene.free_positions
        pick = things[int(rng.integers(len(things)))]
        if kind == "colour":
            colour = [c for c in COLOURS if c != pick.colour][int(rng.integers(len(COLOURS) - 1))]
            return Case2(index, kind, scene, edit_thing(scene, pick.position, colour=colour))
        if kind == "position" and free:
            where = free[int(rng.integers(len(free)))]
            return Case2(index, kind, scene, edit_thing(scene, pick.position, position=where))
        if kind == "pose" and pick.pose is not None:
            pose = [p for p in POSES if p != pick.pose][int(rng.integers(len(POSES) - 1))]
            return Case2(index, kind, scene, edit_thing(scene, pick.position, pose=pose))
        if kind == "add" and free:
            thing = sample_thing_for(scene, rng, position=free[int(rng.integers(len(free)))])
            return Case2(index, kind, scene, add_thing(scene, thing))
        if kind == "remove" and len(things) > 1:
            return Case2(index, kind, scene, remove_thing(scene, pick.position))


def select_cases(end: int, start: int = 0, held_out: bool = False) -> list[Case2]:
    """Cases start … end − 1 of the tuning set, or of the held-out set; the kinds in turn."""
    if end < 1:
        raise InputError(f"--cases must be at least 1, got {end}")
    if not 0 <= start < end:
        raise InputError(f"--from-case must lie in [0, --cases), got {start}")
    seed = SEEDS["held-out" if held_out else "tune"]
    return [make_case(i, KINDS[i % len(KINDS)], seed) for i in range(start, end)]


def load_cascade(model: str, device: str):
    """A ShapesWorld 2 cascade for a benchmark script: a pixel cascade with the `sr128` stage,
    or InputError."""
    from ..backends import load_backend, require_family
    from ..shapes2.model import SR_STAGE

    backend = load_backend(model, device=device)
    require_family(backend, "pixel-cascade", "this benchmark")
    if SR_STAGE not in getattr(backend, "stages", {}):
        raise InputError(f"{model} has no {SR_STAGE} stage: not a ShapesWorld 2 cascade")
    return backend


def score_example(out, name: str, text: str, entries: list[dict]) -> str:
    """`imagic bench score-edit` on an edit of one of this world's shipped examples: each
    output checked against the scene the example's edit asks for (`check_edit`: target, the
    rest kept, identity, pebbles, background PSNR), then the counts."""
    source, target = example_scenes(name)
    wanted = caption(target, prefix=0)
    if sorted_objects(text) != sorted_objects(wanted):
        raise InputError(f"score-edit scores {name}'s own edit, {wanted!r}; this edit asked for "
                         f"{text!r}")
    lines = [f"{name}: {text!r}"]
    success = 0
    for entry in entries:
        with Image.open(out / entry["file"]) as picture:
            c = check_edit(picture.convert("RGB"), source, target)
        success += c["success"]
        lines.append(
            f"  η {entry['eta']:.2f} seed {entry['seed']}: target {_yes(c['target'])}, others "
            f"kept {_yes(c['kept'])}, identity {_yes(c['identity'])}{_why(c)}, pebbles "
            f"{_yes(c['pebbles'])}, background PSNR {c['background_psnr']:.1f} dB")
    lines.append(f"success (target, the rest kept, identity) {success}/{len(entries)}")
    return "\n".join(lines)


def sorted_objects(text: str) -> list[dict]:
    """A caption's objects as `parse_caption` reads them, in one order whatever the wording."""
    return sorted(parse_caption(text), key=lambda thing: str(thing["position"]))


def _yes(ok) -> str:
    return "yes" if ok else "no"


def _why(checked: dict) -> str:
    """Why objects that stay are other objects, e.g. " (right object: 1 stripe → 2 spots)"."""
    changes = checked["identity_changes"]
    return "".join(f" ({where} object: {', '.join(words)})" for where, words in changes.items())
