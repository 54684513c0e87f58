"""Pose edits on the ShapesWorld 2 cascade: when the cat reaches its new pose, is it still the same
cat? Per stage-1 learning rate and η: how many outputs reach the target, how many keep every
object's identity, how many both, and, where the target is reached but an object is another one,
whether only its colour details moved (hue, saturation, brightness, marking shade past the
identity measure's tolerances) or its marking changed type or count.

    .venv/bin/python benchmarks/shapes2_pose.py --model imagic:shapes2-128 --cases 8 \
        --embed-lr 0.025 0.005 --eta 0 0.7 0.8 0.9 1 1.2 1.4 1.6 --out /tmp/pose.json

The first N pose cases of ShapesBench 2's tuning set (cases 2, 7, 12, …; the held-out cases are
kept for the report). Per case and learning rate the `shapes2` preset fits once (training seed
0) and stage 3 renders every η as the preset does; each output is read by `check_edit` as
ShapesBench 2 reads it. `e_opt moved` is how far stage 1 took the embedding from e_tgt (the mean
over tokens of ‖e_opt − e_tgt‖). Writes the table to stdout and, with --out, the JSON with every
output's verdict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagic.bench import run_script, write_report  # noqa: E402
from imagic.bench.shapes2 import KINDS, load_cascade, select_cases  # noqa: E402
from imagic.editor import Imagic  # noqa: E402
from imagic.errors import InputError  # noqa: E402
from imagic.presets import get_preset  # noqa: E402
from imagic.shapes2.detect import (  # noqa: E402
    IDENTITY_THRESHOLD,
    detect,
    identity_of,
    identity_parts,
)
from imagic.shapes2.evaluate import check_edit, unnamed_details  # noqa: E402


def pose_cases(count: int) -> list:
    """The first `count` pose cases of the tuning set: the cases `imagic bench shapes` runs under
    the same indices."""
    return [case for case in select_cases(len(KINDS) * count) if case.kind == "pose"]


def readings(image, case) -> list[dict | None]:
    """Per object of the input that stays: the two parts of how far its unnamed details moved
    (`identity_parts`: colour and marking; the same object while they add up to less than 1),
    or None where the output has no object in its place."""
    found = detect(np.asarray(image.convert("RGB")))
    inputs = {unnamed_details(t): t for t in case.source.things}
    out = []
    for thing in case.target.things:
        before = identity_of(case.source, inputs[unnamed_details(thing)].position)
        after = found.at(thing.position)
        if after is None:
            out.append(None)
            continue
        colour, marking = identity_parts(before, after)
        out.append({"colour": colour, "marking": marking})
    return out


def lost(objects: list[dict | None]) -> list[str]:
    """Per object that is not the same object (`readings`): "marking" when its marking changed
    type or count (or the object is not found), else "colour"."""
    return ["marking" if o is None or o["marking"] else "colour"
            for o in objects if o is None or o["colour"] + o["marking"] >= IDENTITY_THRESHOLD]


def measure(backend, cases: int, embed_lrs: list[float], etas: list[float],
            config=None) -> list[dict]:
    """One row per case, stage-1 learning rate and η (`config`: the recipe, default the
    `shapes2` preset)."""
    config = config or get_preset("shapes2")
    rows = []
    for case in pose_cases(cases):
        for lr in embed_lrs:
            editor = Imagic(backend, config.with_options(seeds=config.seeds[:1], embed_lr=lr),
                            quiet=True)
            session = editor.fit(case.image(), case.text)
            moved = (session.e_opt.hidden_states - session.e_tgt.hidden_states).norm(dim=-1)
            for result in editor.generate(session, etas=etas):
                verdict = check_edit(result.image, case.source, case.target)
                objects = readings(result.image, case)
                rows.append({"case": case.index, "embed_lr": lr, "eta": result.eta,
                             "e_opt_moved": round(float(moved.mean()), 3),
                             **{k: bool(verdict[k]) for k in ("target", "kept", "identity",
                                                                "success")},
                             "objects": objects, "lost": lost(objects)})
        print(f"case {case.index} done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per learning rate and η: outputs that reach the target, keep identity, both; and of
    those that reach the target but lose an object, how many lose it by colour alone."""
    head = ["stage-1 lr", "e_opt moved", "η", "target", "identity", "both (success)",
            "target, identity lost: colour only / marking"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for lr in sorted({r["embed_lr"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["embed_lr"] == lr]
        moved = np.mean([m for _, m in {(r["case"], r["e_opt_moved"]) for r in mine}])
        for eta in sorted({r["eta"] for r in mine}):
            at = [r for r in mine if r["eta"] == eta]
            n = len(at)
            missed = [r for r in at if r["target"] and not r["identity"]]
            marking = sum("marking" in r["lost"] for r in missed)
            lines.append(
                f"| {lr:g} | {moved:.2f} | {eta:g} | {sum(r['target'] for r in at)} / {n} | "
                f"{sum(r['identity'] for r in at)} / {n} | {sum(r['success'] for r in at)} / {n}"
                f" | {len(missed) - marking} / {marking} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a ShapesWorld 2 cascade")
    parser.add_argument("--cases", type=int, default=8, help="the first N pose tuning cases")
    parser.add_argument("--embed-lr", type=float, nargs="+",
                        help="stage 1's learning rates, each (default: the preset's)")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.0, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    lrs = args.embed_lr or [get_preset("shapes2").embed_lr]
    if min(lrs) <= 0:
        raise InputError(f"--embed-lr must be positive, got {min(lrs)}")
    backend = load_cascade(args.model, args.device)
    rows = measure(backend, args.cases, lrs, args.eta)
    print(table(rows))
    write_report(args.out, "benchmarks/shapes2_pose.py", sys.argv[1:], args.device,
                 model=backend.identity, cases=args.cases, rows=rows)
    return 0


if __name__ == "__main__":
    run_script(main)
