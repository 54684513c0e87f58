"""Scoring ShapesWorld 2 models with the analytic detectors: text-to-image accuracy, and one
edit against the scene it came from (target reached, every other named attribute kept, each kept
object still the same object, the background's pebbles where they were)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from ..shapes.evaluate import (
    BAR_ALL,
    BAR_EACH,
    DEFAULT_GUIDANCE,
    check_evaluation,
    masked_ssim,
    sample_seed,
)
from .detect import (
    compare,
    detect,
    dilate,
    find_pebbles,
    identity_changes,
    identity_of,
    match_pebbles,
    same_identity,
)
from .world import ATTRIBUTES, Scene, Thing, pebble_mask, random_caption_and_scene, render

_IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(Thing) if f.name not in ATTRIBUTES)


def text_to_image_accuracy(backend, samples: int = 500, seed: int = 0,
                           guidance: float = DEFAULT_GUIDANCE, steps: int = 50, batch: int = 50,
                           rows: bool = False, progress: bool = True) -> dict:
    """One image per random caption, read back by :func:`detect`: per attribute the fraction of
    objects read right, the fraction of images with the right object count, and the fraction
    with everything right (count and every attribute of every object). Sample i's noise comes
    from its own generator (`sample_seed`), so `batch` never changes a sample."""
    check_evaluation(samples, steps, batch, seed=seed, guidance=guidance)
    pairs = evaluation_captions(samples, seed)
    uncond = backend.encode_text([""])
    verdicts = []
    start = time.perf_counter()
    with tqdm(total=samples, desc="evaluate", unit="img", disable=not progress) as bar:
        for lo in range(0, samples, batch):
            chunk = pairs[lo : lo + batch]
            generators = [torch.Generator().manual_seed(sample_seed(seed, lo + i))
                          for i in range(len(chunk))]
            images = backend.sample(backend.encode_text([text for _, text in chunk]), uncond,
                                    generators, steps, guidance)
            verdicts += read_samples(chunk, images)
            bar.update(len(chunk))
    accuracy, all_correct = tally(pairs, verdicts)
    result = {
        "world": "shapes2", "samples": samples, "seed": seed, "guidance": guidance,
        "steps": steps, "objects": sum(len(scene.things) for scene, _ in pairs),
        "accuracy": accuracy, "all_correct": all_correct,
        "meets_bar": all_correct >= BAR_ALL and min(accuracy.values()) >= BAR_EACH,
        "seconds": round(time.perf_counter() - start, 1),
        "model": {k: backend.identity.get(k) for k in ("source", "name", "revision")},
    }
    if rows:
        result["rows"] = [{"index": i, "caption": text, **verdict}
                          for i, ((_, text), verdict) in enumerate(zip(pairs, verdicts))]
    return result


def evaluation_captions(samples: int, seed: int) -> list[tuple[Scene, str]]:
    """The evaluation's (scene, caption) pairs: the first `samples` random captions of `seed`."""
    rng = np.random.default_rng(seed)
    return [random_caption_and_scene(rng) for _ in range(samples)]


def read_samples(pairs: list[tuple[Scene, str]], images) -> list[dict]:
    """Each image read by :func:`detect` and compared with its pair's scene (`compare`)."""
    return [compare(detect(np.asarray(image)), scene) for (scene, _), image in zip(pairs, images)]


def tally(pairs: list[tuple[Scene, str]], verdicts: list[dict]) -> tuple[dict[str, float], float]:
    """Per attribute the fraction of objects read right (pose: of the objects with a pose), the
    fraction of images with the right object count (`count`), and the fraction of images with
    everything right."""
    right: Counter[str] = Counter()
    named: Counter[str] = Counter()
    for (scene, _), verdict in zip(pairs, verdicts):
        for thing, reading in zip(scene.things, verdict["things"]):  # compare's order
            for attribute, ok in reading.items():
                if attribute != "pose" or thing.pose is not None:
                    named[attribute] += 1
                    right[attribute] += ok
    accuracy = {a: right[a] / named[a] for a in ATTRIBUTES if named[a]}
    accuracy["count"] = sum(v["count"] for v in verdicts) / len(verdicts)
    return accuracy, sum(v["all"] for v in verdicts) / len(verdicts)


def check_edit(image, source: Scene, target: Scene) -> dict:
    """Score an edit of the render of `source` meant to show `target` (`source` with one change:
    an attribute, an object added or removed; `edit_thing`, `add_thing`, `remove_thing`).

    Returns: target (what changed reads as asked: the changed attributes, or the added object
    whole, or the removed one gone), kept (the object count, and every attribute that did not
    change, of every object), identity (every object that stays is still the same object:
    `same_identity` with the input's), pebbles (every pebble of the input clear of the objects
    has a pebble of the output within the match distance, and the output has no other),
    success (target, kept and identity), background_psnr (dB) and background_ssim outside the
    objects of input and output (each dilated), the detection's object count, and
    same_objects: per object that stays, whether it is the same object, and identity_changes:
    position -> what makes the object there another one (`identity_changes`), per object that
    is not the same.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    found = detect(array)
    verdict = compare(found, target)
    before = {unnamed_details(t): t for t in source.things}
    changed_ok, kept_ok, identity_ok = [], [verdict["count"]], []
    why = {}  # position -> what changed the object that stays there
    for thing, right in zip(target.things, verdict["things"]):  # compare's order
        old = before.pop(unnamed_details(thing), None)
        if old is None:  # added: all of it is the target
            changed_ok.append(all(right.values()))
            continue
        for attribute, ok in right.items():
            (changed_ok if getattr(old, attribute) != getattr(thing, attribute)
             else kept_ok).append(ok)
        reading = found.at(thing.position)
        before_identity = identity_of(source, old.position)
        identity_ok.append(reading is not None and same_identity(reading, before_identity))
        if not identity_ok[-1]:
            why[thing.position] = (identity_changes(before_identity, reading)
                                   if reading is not None else ["not found"])
    for old in before.values():  # removed: its slot must read empty
        changed_ok.append(found.at(old.position) is None)
    objects = np.zeros(array.shape[:2], bool)
    for mask in (detect(render(source)).mask, found.mask):
        objects |= dilate(mask)
    hidden = dilate(objects)
    expected = [(x, y) for x, y, r in source.pebbles
                if not (pebble_mask(source.replace(pebbles=((x, y, r),))) & hidden).any()]
    matched, added = match_pebbles(expected, find_pebbles(array, hidden))
    original = render(source)
    diff = (array.astype(np.float64) - original.astype(np.float64))[~objects]
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    result = {
        "target": all(changed_ok),
        "kept": all(kept_ok),
        "identity": all(identity_ok),
        "same_objects": identity_ok,
        "identity_changes": why,
        "pebbles": matched == len(expected) and added == 0,
        "objects": found.count,
        "background_psnr": 10 * np.log10(255.0**2 / max(mse, 1e-10)),
        "background_ssim": masked_ssim(array, original, ~objects),
    }
    result["success"] = result["target"] and result["kept"] and result["identity"]
    return result


def unnamed_details(thing: Thing) -> tuple:
    """What an edit of a named attribute never changes: the key that finds an edited object's
    input object."""
    return tuple(getattr(thing, name) for name in _IDENTITY_FIELDS)



def markdown_table(result: dict) -> str:
    """The accuracy result as a small markdown table, with the bar beside each figure."""
    lines = [
        f"{result['samples']} samples, seed {result['seed']}, guidance {result['guidance']:g}, "
        f"{result['steps']} DDIM steps",
        "",
        "| measure | accuracy | bar |",
        "| --- | --- | --- |",
    ]
    for name, value in result["accuracy"].items():
        lines.append(f"| {name} | {value:.1%} | ≥ {BAR_EACH:.0%} |")
    lines.append(f"| everything in the image | {result['all_correct']:.1%} | ≥ {BAR_ALL:.0%} |")
    lines += ["", f"bar {'met' if result['meets_bar'] else 'NOT met'}"]
    return "\n".join(lines)
