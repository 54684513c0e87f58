"""The augmentation level at which the ShapesWorld 2 cascade's super-resolution stage should
sample, and how much of the model's text-to-image error is that stage's own.

    .venv/bin/python benchmarks/shapes2_sr_level.py --model training/shapes2/model \
        --samples 100 --seed 1 --levels 0 25 50 100 --out /tmp/sr-level.json

Imagen's super-resolution stages read the previous stage's image noised to an augmentation level
(training: a random level, so the stage learns to ignore the previous stage's artefacts;
sampling: one fixed level, `imagic_model.json`'s `noise_level`). Too low a level and the stage
copies the base's artefacts; too high and it stops following the base's shapes. This measures it:

- the base samples each caption once (guidance 4 and 50 DDIM steps, each sample's generator
  seeded as `imagic eval-shapes` seeds it);
- the stage upsamples those same base images at every level, each time from the same noise, so
  the levels differ by nothing else;
- `truth`: the stage at the model's own level, from the true scenes brought down to 32 px as
  training brings them: what the stage gets right when the base is perfect, and how often it
  gives the scene itself back, every object the same object by its unnamed details
  (`identity`) and every pebble in place (`pebbles`), read by `check_edit` as an edit that
  changed nothing, and the share of all objects that stay the same object (`same objects`,
  `same_identity`): the most an edit could keep through the stage as trained; and how far the
  stage moves the objects' colour (`colour shift`: its output area-averaged back to 32 px
  against the 32 px image it read, over the pixels the objects cover whole, the per-channel
  mean difference's magnitude in 1/255, averaged over images): what it changes of what it was
  given rather than adds.

Every image is read by the detectors as in `imagic eval-shapes`. Choose the level on captions of
seed 1 or more: the model card's evaluation uses seed 0, and a level chosen on its captions would
be tuned on the figures it reports. Writes the table to stdout and, with --out, the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagic.backends import load_backend, require_family  # noqa: E402
from imagic.backends.cascade import resize  # noqa: E402
from imagic.bench import provenance  # noqa: E402
from imagic.errors import InputError  # noqa: E402
from imagic.shapes.evaluate import DEFAULT_GUIDANCE, sample_seed  # noqa: E402
from imagic.shapes2.detect import detect  # noqa: E402
from imagic.shapes2.evaluate import (  # noqa: E402
    check_edit,
    evaluation_captions,
    read_samples,
    tally,
)
from imagic.shapes2.model import SR_STAGE  # noqa: E402
from imagic.shapes2.world import ATTRIBUTES, render  # noqa: E402

COLUMNS = (*ATTRIBUTES, "count")


def measure(backend, samples: int, seed: int, levels: list[int], steps: int = 50,
            guidance: float = DEFAULT_GUIDANCE) -> list[dict]:
    """One row per level, then the `truth` row: the level, the source of the 32 px images,
    per-attribute accuracy, the fraction with everything right, and the stage's seconds."""
    stage = backend.stages[SR_STAGE]
    own_level = stage.noise_level
    pairs = evaluation_captions(samples, seed)
    conds = backend.encode_text([text for _, text in pairs])
    uncond = backend.encode_text([""])
    generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(samples)]
    base = backend.sample_base(conds, uncond, generators, steps, guidance).clamp(-1, 1)
    after_base = [g.get_state() for g in generators]  # where the stage's draws begin
    # the true scenes at the base's resolution, as the engine brings an input down to it
    truth = torch.cat([backend.encode_image(Image.fromarray(render(scene))) for scene, _ in pairs])
    rows = []
    try:
        for level, source, low in [*((lv, "base", base) for lv in levels),
                                   (own_level, "truth", truth)]:
            stage.noise_level = level
            for g, state in zip(generators, after_base):
                g.set_state(state)
            start = time.perf_counter()
            high = backend.upsample(SR_STAGE, low, conds, uncond, generators, steps)
            images = backend.decode(high)
            seconds = time.perf_counter() - start
            accuracy, all_correct = tally(pairs, read_samples(pairs, images))
            rows.append({"level": level, "source": source, "accuracy": accuracy,
                         "all_correct": all_correct, "seconds": round(seconds, 1)})
            if source == "truth":  # the scene given back, as an edit that changed nothing
                kept = [check_edit(image, scene, scene) for (scene, _), image in zip(pairs, images)]
                for key in ("identity", "pebbles"):
                    rows[-1][key] = sum(c[key] for c in kept) / len(kept)
                same = [ok for c in kept for ok in c["same_objects"]]
                rows[-1]["same_objects"] = sum(same) / len(same)
                rows[-1]["colour_shift"] = colour_shift(high, low, [s for s, _ in pairs])
            print(row_line(rows[-1]), flush=True)
    finally:
        stage.noise_level = own_level
    return rows


def colour_shift(high: torch.Tensor, low: torch.Tensor, scenes) -> float | None:
    """Mean over images of |mean over the objects' whole 32 px pixels of (high area-averaged
    to 32 px − low)|, averaged over channels, in 1/255 (None: no object covers a whole pixel)."""
    side = low.shape[-1]
    block = high.shape[-1] // side
    shifts = []
    for image, given, scene in zip(resize(high.clamp(-1, 1), side), low, scenes):
        mask = detect(render(scene)).mask.reshape(side, block, side, block).all(axis=(1, 3))
        if mask.any():
            diff = (image - given)[:, torch.from_numpy(mask)].mean(dim=1)
            shifts.append(float(diff.abs().mean()) * 127.5)
    return round(sum(shifts) / len(shifts), 2) if shifts else None


def row_line(row: dict) -> str:
    """The row in the table `main` prints (– for an attribute no caption named)."""
    acc = row["accuracy"]
    cells = [str(row["level"]), row["source"],
             *(f"{acc[a]:.0%}" if a in acc else "–" for a in COLUMNS), f"{row['all_correct']:.0%}",
             *(f"{row[k]:.0%}" if k in row else "–"
               for k in ("identity", "pebbles", "same_objects")),
             f"{row['colour_shift']:.1f}" if row.get("colour_shift") is not None else "–"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a ShapesWorld 2 cascade model folder")
    parser.add_argument("--samples", type=int, default=100, help="captions (default 100)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seeds the captions and the noise (default 1: held out)")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 25, 50, 100],
                        help="augmentation timesteps to sample the stage at")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    backend = load_backend(args.model, device=args.device)
    require_family(backend, "pixel-cascade", "this benchmark")
    if SR_STAGE not in getattr(backend, "stages", {}):
        raise InputError(f"{args.model} has no {SR_STAGE} stage: not a ShapesWorld 2 cascade")
    top = backend.stages[SR_STAGE].max_noise_level
    if args.samples < 1 or any(not 0 <= lv <= top for lv in args.levels):
        raise InputError(f"--samples must be 1 or more and each level from 0 to {top}")
    header = ["level", "32 px images", *COLUMNS, "everything", "identity", "pebbles",
              "same objects", "colour shift, /255"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header), flush=True)
    rows = measure(backend, args.samples, args.seed, args.levels)
    if args.out:
        report = {**provenance(["benchmarks/shapes2_sr_level.py", *sys.argv[1:]], args.device),
                  "model": backend.identity, "samples": args.samples, "seed": args.seed,
                  "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
