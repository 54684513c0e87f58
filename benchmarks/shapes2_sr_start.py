"""Where the ShapesWorld 2 cascade's super-resolution stage should start an inversion-start edit:
from fresh noise (Imagen's stage, and this preset's until the stage started from its inversion)
or from its own DDIM inversion of the input.

    .venv/bin/python benchmarks/shapes2_sr_start.py --model imagic:shapes2-128 --cases 10 \
        --eta 0.8 0.9 1.0 --out /tmp/sr-start.json

Per ShapesBench 2 tuning case (the held-out cases are kept for the report), the `shapes2`
preset fits once (stages 1 and 2, training seed 0); then stage 3 samples the base from the
input's inversion at each η, and `sr128` upsamples those same base images twice, from the seed's
noise and from its inversion of the input (conditioned on e_tgt and on the input's own 32 px
image, the same augmentation noise), so the two differ by nothing else. Every output is read by
`check_edit` as ShapesBench 2 reads it. Writes the table to stdout and, with --out, the JSON with
every output's verdict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagic.bench import run_script, write_report  # noqa: E402
from imagic.bench.shapes2 import load_cascade, select_cases  # noqa: E402
from imagic.editor import Imagic, sample  # noqa: E402
from imagic.errors import InputError  # noqa: E402
from imagic.presets import get_preset  # noqa: E402
from imagic.shapes2.evaluate import check_edit  # noqa: E402

STARTS = ("noise", "inversion")
VERDICTS = ("success", "target", "kept", "identity", "pebbles")


def measure(backend, cases: int, etas: list[float], config=None) -> list[dict]:
    """One row per case, η and start of the super-resolution stage (`config`: the recipe,
    default the `shapes2` preset)."""
    config = config or get_preset("shapes2")
    editor = Imagic(backend, config, quiet=True)
    uncond = backend.encode_text([""])
    rows = []
    for case in select_cases(cases):
        session = editor.fit(case.image(), case.text)
        e_tgt, e_opt = (e.map(lambda t: t.to(backend.device))
                        for e in (session.e_tgt, session.e_opt))
        jobs = [(config.seeds[0], eta) for eta in etas]
        with backend.apply_delta(session.delta):
            x_start = backend.invert(backend.encode_image(session.input_image), e_opt,
                                     config.sample_steps)
            for start in STARTS:
                images = sample(backend, jobs, e_tgt, e_opt, uncond, config, x_start,
                                session.input_image if start == "inversion" else None)
                for eta, image in zip(etas, images):
                    verdict = check_edit(image, case.source, case.target)
                    rows.append({"case": case.index, "kind": case.kind, "eta": eta,
                                 "start": start, **{k: bool(verdict[k]) for k in VERDICTS},
                                 "background_psnr": round(verdict["background_psnr"], 2)})
        print(f"case {case.index} ({case.kind}): " + ", ".join(
            f"{r['start']} η {r['eta']} {'ok' if r['success'] else '–'}"
            for r in rows if r["case"] == case.index), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], etas: list[float]) -> str:
    head = ["`sr128` starts from", "η", *VERDICTS, "background PSNR, dB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for start in STARTS:
        for eta in etas:
            mine = [r for r in rows if r["start"] == start and r["eta"] == eta]
            cells = [f"{sum(r[k] for r in mine)} / {len(mine)}" for k in VERDICTS]
            psnr = sum(r["background_psnr"] for r in mine) / len(mine)
            lines.append(f"| {start} | {eta} | " + " | ".join(cells) + f" | {psnr:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a ShapesWorld 2 cascade")
    parser.add_argument("--cases", type=int, default=10, help="tuning cases 0 … N−1 (default 10)")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.8, 0.9, 1.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    backend = load_cascade(args.model, args.device)
    rows = measure(backend, args.cases, args.eta)
    print(table(rows, args.eta))
    write_report(args.out, "benchmarks/shapes2_sr_start.py", sys.argv[1:], args.device,
                 model=backend.identity, cases=args.cases, rows=rows)
    return 0


if __name__ == "__main__":
    run_script(main)
