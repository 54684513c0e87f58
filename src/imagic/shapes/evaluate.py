"""Text-to-image accuracy of a ShapesWorld model, scored by the analytic detectors.

The bar the embedded model must clear: over >= 500 random captions, all four attributes right
in >= 90% of the samples and each attribute right in >= 95% (fixed seeds, default guidance).
Everything is seeded, so two runs on the same model and device give the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..images import write_text_atomic
from .detect import compare, detect, dilate, find_pebbles, match_pebbles
from .world import ATTRIBUTES, random_caption_and_scene

DEFAULT_GUIDANCE = 4.0  # classifier-free guidance of the grids and of the accuracy bar
BAR_ALL = 0.90  # fraction of samples with every attribute right
BAR_EACH = 0.95  # fraction right, for each attribute on its own


def sample_seed(seed: int, index: int) -> int:
    """The initial-noise seed of sample `index` in a run seeded with `seed`."""
    return seed * 1_000_003 + index


def check_evaluation(samples: int, steps: int, batch: int, report: str | None = None,
                     seed: int = 0, guidance: float = DEFAULT_GUIDANCE) -> None:
    """Numbers an evaluation can use, and a report path that can be written, checked before
    any model loads."""
    for flag, value in (("--samples", samples), ("--batch", batch), ("--steps", steps)):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if not 0 <= seed < 2**32:  # sample_seed multiplies it: the product must fit a generator
        raise InputError(f"--seed must be between 0 and 2^32 - 1, got {seed}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise InputError(f"--guidance must be a finite number, 0 or more, got {guidance}")
    if report:
        target = Path(report)
        if target.is_dir() or not target.parent.is_dir():
            raise InputError(f"--json {target}: name a file in an existing folder")


def write_report(result: dict, path: str | Path) -> None:
    write_text_atomic(json.dumps(result, indent=2) + "\n", Path(path))


def text_to_image_accuracy(
    backend,
    samples: int = 500,
    seed: int = 0,
    guidance: float = DEFAULT_GUIDANCE,
    steps: int = 50,
    batch: int = 100,
    rows: bool = False,
    progress: bool = True,
) -> dict:
    """Generate one image per random caption and score it with :func:`detect`.

    The captions come from ``random_caption_and_scene`` seeded with ``seed``; the initial noise
    of sample i from its own generator (:func:`sample_seed`), so changing ``batch`` never
    changes a sample.  Returns per-attribute accuracy, the fraction with all four right, the
    detector's status counts, whether the bar is met and (with ``rows``) one row per sample.
    """
    check_evaluation(samples, steps, batch, seed=seed, guidance=guidance)
    rng = np.random.default_rng(seed)
    pairs = [random_caption_and_scene(rng) for _ in range(samples)]
    uncond = backend.encode_text([""])
    right = {a: 0 for a in ATTRIBUTES}
    all_right = 0
    status: Counter[str] = Counter()
    table = []
    start = time.perf_counter()
    with tqdm(total=samples, desc="evaluate", unit="img", disable=not progress) as bar:
        for lo in range(0, samples, batch):
            chunk = pairs[lo : lo + batch]
            captions = [text for _, text in chunk]
            generators = [
                torch.Generator().manual_seed(sample_seed(seed, lo + i)) for i in range(len(chunk))
            ]
            images = backend.sample(backend.encode_text(captions), uncond, generators, steps,
                                    guidance)
            for i, ((scene, text), image) in enumerate(zip(chunk, images)):
                found = detect(np.asarray(image))
                verdict = compare(found, scene)
                status[found.status] += 1
                for a in ATTRIBUTES:
                    right[a] += verdict[a]
                all_right += all(verdict.values())
                if rows:
                    table.append({"index": lo + i, "caption": text, "status": found.status,
                                  "detected": found.attributes, **verdict})
            bar.update(len(chunk))
    accuracy = {a: right[a] / samples for a in ATTRIBUTES}
    all_correct = all_right / samples
    result = {
        "samples": samples,
        "seed": seed,
        "guidance": guidance,
        "steps": steps,
        "accuracy": accuracy,
        "all_correct": all_correct,
        "status": {s: status.get(s, 0) for s in ("ok", "no object", "several objects")},
        "meets_bar": all_correct >= BAR_ALL and min(accuracy.values()) >= BAR_EACH,
        "seconds": round(time.perf_counter() - start, 1),
        "model": {k: backend.identity.get(k) for k in ("source", "name", "revision")},
    }
    if rows:
        result["rows"] = table
    return result


def markdown_table(result: dict) -> str:
    """The accuracy result as a small markdown table, with the bar next to each figure."""
    lines = [
        f"{result['samples']} samples, seed {result['seed']}, guidance {result['guidance']:g}, "
        f"{result['steps']} DDIM steps",
        "",
        "| measure | accuracy | bar |",
        "| --- | --- | --- |",
    ]
    for a, value in result["accuracy"].items():
        lines.append(f"| {a} | {value:.1%} | ≥ {BAR_EACH:.0%} |")
    lines.append(f"| all four | {result['all_correct']:.1%} | ≥ {BAR_ALL:.0%} |")
    counts = ", ".join(f"{k} {v}" for k, v in result["status"].items())
    lines += ["", f"detector: {counts}; bar {'met' if result['meets_bar'] else 'NOT met'}"]
    return "\n".join(lines)


def check_edit(image, source, target: dict) -> dict:
    """Score one edited image against the render it came from.

    `source` is the input Scene; `target` the attributes the text asked for (e.g. {"colour":
    "blue"}). Returns: target (every asked attribute reads as asked), kept (every other
    attribute reads as in the input), pebbles (the input's pebbles are where they were and
    there are no new ones: every pebble of the input outside the objects has a pebble of the
    output within 1.5 px, and the output has no other; `find_pebbles`), pebbles_expected,
    pebbles_found and pebbles_added (the counts behind it), background_psnr (dB, outside the
    input's object and the detected object), background_ssim, and the detection itself.
    """
    from .world import object_mask, pebble_mask, render

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    found = detect(array)
    wanted = {**source.attributes, **target}
    right = compare(found, wanted)
    objects = object_mask(source) | dilate(found.mask)  # generated edges are soft
    outside = ~objects
    original = render(source).astype(np.float64)
    diff = (array.astype(np.float64) - original)[outside]
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    # Pebbles are looked for outside the objects and a one-pixel margin; a pebble of the input
    # that touches that region is not asked for (an object may cover it).
    hidden = dilate(objects)
    expected = [(x, y) for x, y, r in source.pebbles
                if not (pebble_mask(source.replace(pebbles=((x, y, r),))) & hidden).any()]
    matched, added = match_pebbles(expected, find_pebbles(array, hidden))
    return {
        "status": found.status,
        "detected": found.attributes,
        "target": all(right[k] for k in target),
        "kept": all(v for k, v in right.items() if k not in target),
        "pebbles": matched == len(expected) and added == 0,
        "pebbles_expected": len(expected),
        "pebbles_found": matched,
        "pebbles_added": added,
        "background_psnr": 10 * np.log10(255.0**2 / max(mse, 1e-10)),
        "background_ssim": masked_ssim(array, original, outside),
    }


def masked_ssim(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """SSIM (torchmetrics, 7×7 Gaussian window for 32 px images) averaged over `mask`."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    def tensor(a):
        return torch.from_numpy(np.asarray(a, np.float32)).permute(2, 0, 1).unsqueeze(0)

    _, full = ssim(tensor(image), tensor(reference), kernel_size=7, sigma=1.0,
                   data_range=255.0, return_full_image=True)
    per_pixel = full[0].mean(0).numpy()
    return float(per_pixel[mask].mean()) if mask.any() else 1.0

