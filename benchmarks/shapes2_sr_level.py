"""The augmentation level at which the ShapesWorld 2 cascade's super-resolution stage should
sample, and how much of the model's text-to-image error is that stage's own.

    .venv/bin/python benchmarks/shapes2_sr_level.py --model imagic:shapes2-128 \
        --samples 100 --seed 1 --levels 0 25 50 100 --finetuned 20 --out /tmp/sr-level.json

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
  given rather than adds. The truth row is measured with the stage consistent (its output
  kept at the 32 px image it read, `imagic_model.json`'s `consistent`) and without, whatever the
  model says; the levels' rows sample as the model says.
- `truth, fine-tuned` (`--finetuned N`): the truth rows again for the first N scenes, each time
  after stage 2 fine-tuned the stage on that scene at its caption, as the `shapes2` preset
  fine-tunes it on an edit's input (the stage's weights restored after each): how much of the
  input an edit's stage 3 could carry through the stage.

Every image is read by the detectors as in `imagic eval-shapes`. Choose the level on captions of
seed 1 or more: the model card's evaluation uses seed 0, and a level chosen on its captions would
be tuned on the figures it reports. Writes the table to stdout and, with --out, the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagic.backends.cascade import resize  # noqa: E402
from imagic.bench import run_script, write_report  # noqa: E402
from imagic.bench.shapes2 import load_cascade  # noqa: E402
from imagic.editor import finetune  # noqa: E402
from imagic.errors import InputError  # noqa: E402
from imagic.presets import EditConfig, get_preset  # noqa: E402
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
            guidance: float = DEFAULT_GUIDANCE, finetuned: int = 0,
            config: EditConfig | None = None) -> list[dict]:
    """One row per level, then the `truth` rows, not consistent and consistent, then with
    `finetuned` the same two for that many of the scenes, each after stage 2 fine-tuned the
    stage on the scene at its caption (`config`'s aux_finetune_*, default the `shapes2`
    preset). A row: the level, the source of the 32 px images, whether the stage kept them,
    per-attribute accuracy, the fraction with everything right, and the stage's seconds."""
    stage = backend.stages[SR_STAGE]
    own_level, own_consistent = stage.noise_level, stage.consistent
    pairs = evaluation_captions(samples, seed)
    conds = backend.encode_text([text for _, text in pairs])
    uncond = backend.encode_text([""])
    generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(samples)]
    base = backend.sample_base(conds, uncond, generators, steps, guidance).clamp(-1, 1)
    after_base = [g.get_state() for g in generators]  # where the stage's draws begin
    # the true scenes at the base's resolution, as the engine brings an input down to it
    truth = torch.cat([backend.encode_image(Image.fromarray(render(scene))) for scene, _ in pairs])

    def upsample(low, rows=slice(None)):
        for g, state in zip(generators[rows], after_base[rows]):
            g.set_state(state)
        return backend.upsample(SR_STAGE, low, conds.map(lambda t: t[rows]), uncond,
                                generators[rows], steps)

    rows = []
    try:
        for level, source, low, consistent in [
                *((lv, "base", base, own_consistent) for lv in levels),
                *((own_level, "truth", truth, kept) for kept in (False, True))]:
            stage.noise_level, stage.consistent = level, consistent
            start = time.perf_counter()
            high = upsample(low)
            rows.append(scored(pairs, high, low if source == "truth" else None,
                               backend.decode(high), level=level, source=source,
                               consistent=consistent,
                               seconds=round(time.perf_counter() - start, 1)))
            print(row_line(rows[-1]), flush=True)
        highs = {False: [], True: []}  # the truth rows left the stage at its own level
        for i, (scene, _) in enumerate(pairs[:finetuned]):
            x0 = backend.encode_image(Image.fromarray(render(scene)), SR_STAGE)
            one = slice(i, i + 1)
            finetune(backend, x0, conds.map(lambda t, one=one: t[one]),
                     config or get_preset("shapes2"), stage=SR_STAGE, quiet=True)
            for consistent in highs:
                stage.consistent = consistent
                highs[consistent].append(upsample(truth[one], one))
            backend.take_delta()
        for consistent, high in highs.items() if finetuned else ():
            high = torch.cat(high)
            rows.append(scored(pairs[:finetuned], high, truth[:finetuned], backend.decode(high),
                               level=own_level, source="truth, fine-tuned",
                               consistent=consistent))
            print(row_line(rows[-1]), flush=True)
    finally:
        stage.noise_level, stage.consistent = own_level, own_consistent
    return rows


def scored(pairs, high: torch.Tensor, given: torch.Tensor | None, images, **row) -> dict:
    """`row` with the attributes read from `images` (the stage's outputs `high`, one per
    (scene, caption) of `pairs`); when the stage was `given` the true scenes, also whether it
    gave each scene back, as an edit that changed nothing."""
    accuracy, all_correct = tally(pairs, read_samples(pairs, images))
    row = {**row, "accuracy": accuracy, "all_correct": all_correct}
    if given is not None:
        kept = [check_edit(image, scene, scene) for (scene, _), image in zip(pairs, images)]
        for key in ("identity", "pebbles"):
            row[key] = sum(c[key] for c in kept) / len(kept)
        same = [ok for c in kept for ok in c["same_objects"]]
        row["same_objects"] = sum(same) / len(same)
        row["colour_shift"] = colour_shift(high, given, [s for s, _ in pairs])
    return row


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
    cells = [str(row["level"]), row["source"], "yes" if row["consistent"] else "no",
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
    parser.add_argument("--finetuned", type=int, default=0, metavar="N",
                        help="also the truth rows of the first N scenes, the stage fine-tuned "
                             "on each as the shapes2 preset's stage 2 does (default 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    backend = load_cascade(args.model, args.device)
    top = backend.stages[SR_STAGE].max_noise_level
    if args.samples < 1 or any(not 0 <= lv <= top for lv in args.levels):
        raise InputError(f"--samples must be 1 or more and each level from 0 to {top}")
    if not 0 <= args.finetuned <= args.samples:
        raise InputError(f"--finetuned must be from 0 to --samples ({args.samples})")
    header = ["level", "32 px images", "consistent", *COLUMNS, "everything", "identity", "pebbles",
              "same objects", "colour shift, /255"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header), flush=True)
    rows = measure(backend, args.samples, args.seed, args.levels, finetuned=args.finetuned)
    write_report(args.out, "benchmarks/shapes2_sr_level.py", sys.argv[1:], args.device,
                 model=backend.identity, samples=args.samples, seed=args.seed,
                 finetuned=args.finetuned, rows=rows)
    return 0


if __name__ == "__main__":
    run_script(main)
