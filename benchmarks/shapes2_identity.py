"""Where a ShapesWorld 2 edit loses its objects' identity: how far each object's unnamed details
(hue, saturation, brightness, marking) move, for the object the edit changes and for the objects
it leaves alone, from η 0 (the fitted model's reconstruction of the input) up.

    .venv/bin/python benchmarks/shapes2_identity.py --model imagic:shapes2-128 --cases 10 \
        --eta 0 0.8 0.9 --steps 50 200 --out /tmp/identity.json

Per ShapesBench 2 tuning case (the held-out cases are kept for the report), the `shapes2`
preset fits once (stages 1 and 2, training seed 0); stage 3 then renders each η at each number
of sampling steps (the base's; `sr128` keeps its own). Each object of the input that stays is
read by the detectors at its place in the output (at η 0, where it was in the input) and
compared with its reading in the input
(`identity_distance`: below 1 the same object; a detail's tolerance counts 1). Writes the table
to stdout and, with --out, the JSON with every object's reading.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagic.bench import run_script, write_report  # noqa: E402
from imagic.bench.shapes2 import load_cascade, select_cases  # noqa: E402
from imagic.editor import Imagic  # noqa: E402
from imagic.errors import InputError  # noqa: E402
from imagic.presets import get_preset  # noqa: E402
from imagic.shapes2.detect import (  # noqa: E402
    IDENTITY_TOLERANCES,
    detect,
    identity_distance,
    identity_of,
)
from imagic.shapes2.evaluate import unnamed_details  # noqa: E402

ROLES = ("edited", "untouched")  # the object whose pose, colour or place the text changes; the rest
DETAILS = {"hue_offset": "hue, °", "saturation": "saturation", "value": "brightness"}


def measure(backend, cases: int, etas: list[float], steps: list[int], config=None) -> list[dict]:
    """One row per case, number of steps, η and object of the input that stays (`config`: the
    recipe, default the `shapes2` preset)."""
    config = config or get_preset("shapes2")
    editor = Imagic(backend, config.with_options(seeds=config.seeds[:1]), quiet=True)
    rows = []
    for case in select_cases(cases):
        session = editor.fit(case.image(), case.text)
        inputs = {unnamed_details(t): t for t in case.source.things}
        pairs = [(inputs[unnamed_details(t)], t) for t in case.target.things
                 if unnamed_details(t) in inputs]  # an added object has no input
        for n in steps:
            for result in editor.generate(session, etas=etas, sample_steps=n):
                found = detect(np.asarray(result.image.convert("RGB")))
                for old, new in pairs:
                    # η 0 renders the input again: each object is read where it was
                    place = old.position if result.eta == 0 else new.position
                    before, after = identity_of(case.source, old.position), found.at(place)
                    role = "edited" if old.attributes != new.attributes else "untouched"
                    row = {"case": case.index, "kind": case.kind, "steps": n, "eta": result.eta,
                           "role": role, "found": after is not None}
                    if after is not None:
                        row["distance"] = round(identity_distance(before, after), 3)
                        row["marking_kept"] = ((before.marking, before.marks)
                                               == (after.identity.marking, after.identity.marks))
                        row.update({name: round(getattr(after.identity, name)
                                                - getattr(before, name), 4)
                                    for name in IDENTITY_TOLERANCES})
                    rows.append(row)
        print(f"case {case.index} ({case.kind}) done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per number of steps, η and role: how many objects stay the same object, keep their
    marking, and the median and 90th percentile of each colour detail's move (|Δ|)."""
    head = ["steps", "η", "object", "same object", "marking kept",
            *(f"{label} median / 90%" for label in DETAILS.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    keys = sorted({(r["steps"], r["eta"], r["role"]) for r in rows},
                  key=lambda k: (k[0], k[1], ROLES.index(k[2])))
    for n, eta, role in keys:
        mine = [r for r in rows if (r["steps"], r["eta"], r["role"]) == (n, eta, role)]
        read = [r for r in mine if r["found"]]
        same = sum(r["distance"] < 1.0 for r in read)
        marked = sum(r["marking_kept"] for r in read)
        cells = [f"{same} / {len(mine)}", f"{marked} / {len(mine)}"]
        for name in DETAILS:
            moves = np.abs([r[name] for r in read]) if read else np.zeros(1)
            digits = 1 if name == "hue_offset" else 3
            cells.append(f"{np.median(moves):.{digits}f} / {np.quantile(moves, 0.9):.{digits}f}")
        lines.append(f"| {n} | {eta:g} | {role} | " + " | ".join(cells) + " |")
    tol = IDENTITY_TOLERANCES
    lines.append(f"\nEach detail's tolerance counts 1 of the distance: hue {tol['hue_offset']:g}°, "
                 f"saturation {tol['saturation']:g}, brightness {tol['value']:g}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a ShapesWorld 2 cascade")
    parser.add_argument("--cases", type=int, default=10, help="tuning cases 0 … N−1 (default 10)")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.0, 0.8, 0.9])
    parser.add_argument("--steps", type=int, nargs="+", default=[50],
                        help="stage 3's sampling steps, each (default 50, the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    if min(args.steps) < 1:
        raise InputError(f"--steps must be at least 1, got {min(args.steps)}")
    backend = load_cascade(args.model, args.device)
    rows = measure(backend, args.cases, args.eta, args.steps)
    print(table(rows))
    write_report(args.out, "benchmarks/shapes2_identity.py", sys.argv[1:], args.device,
                 model=backend.identity, cases=args.cases, rows=rows)
    return 0


if __name__ == "__main__":
    run_script(main)
