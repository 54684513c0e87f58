"""Probe stage 3's guidance scale on ShapesBench cases, with stages 1–2 fitted once per case.

Guidance enters only stage 3, so one fit per (case, seed) serves every scale: this is
`imagic bench shapes --methods imagic-inversion --guidance G` for several G at the cost of one.
Writes ShapesBench rows (method "imagic-inversion-gG") to OUT/rows.csv, resumable by case, and
prints ShapesBench's η table for each guidance scale.

    python scripts/guidance_probe.py --from-case 16 --cases 40 --guidance 1,1.5,2 --out runs/g
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path

from imagic.backends import load_backend
from imagic.bench.shapes import FIELDS, eta_table, make_cases, read_rows, score
from imagic.editor import Imagic
from imagic.presets import get_preset

ETAS = (0.0, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-case", type=int, default=0)
    parser.add_argument("--cases", type=int, required=True, help="end of the case range")
    parser.add_argument("--guidance", default="1,1.5,2", help="comma-separated scales")
    parser.add_argument("--seed", type=int, default=0, help="stages 1–2's seed")
    parser.add_argument("--model", help="a ShapesWorld model folder (default: the embedded one)")
    parser.add_argument("--out", required=True, help="folder for rows.csv")
    args = parser.parse_args()
    try:
        scales = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        print(f"error: --guidance takes numbers, got {args.guidance!r}", file=sys.stderr)
        return 2
    if not 0 <= args.from_case < args.cases:
        print("error: need 0 ≤ --from-case < --cases", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.csv"
    done = {r["case"] for r in read_rows(path)} if path.exists() else set()
    backend = load_backend(args.model, device="cpu")
    config = replace(get_preset("shapes"), seed=args.seed, seeds=(args.seed,), etas=ETAS)
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for case in make_cases(args.cases)[args.from_case:]:
            if case.index in done:
                continue
            editor = Imagic(backend, config, quiet=True)
            session = editor.fit(case.image(), case.text)
            writer.writerows(  # a case's rows together, so a stopped run resumes cleanly
                score(case, f"imagic-inversion-g{g:g}", r.eta, args.seed, r.image)
                for g in scales for r in editor.generate(session, guidance=g, start="inversion"))
            f.flush()
            print(f"case {case.index} done", flush=True)
    table(read_rows(path))
    return 0


def table(rows: list[dict]) -> None:
    """ShapesBench's own η table (success, pebbles kept, SSIM, PSNR), one per guidance scale."""
    for method in sorted({r["method"] for r in rows}):
        print("\n" + eta_table(rows, method))


if __name__ == "__main__":
    sys.exit(main())
