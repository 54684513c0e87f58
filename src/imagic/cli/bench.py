"""`imagic bench`: ShapesBench and TEdBench runs, merging side-by-side runs, the result tables,
and scoring an edit of a shipped example."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    RECIPE,
    SAMPLING,
    load_model,
    model_options,
    options_given,
    parse_eta_or_auto,
    parse_etas,
    parse_floats,
    parse_seeds,
    recipe_options,
)

SHAPES_EXAMPLE = """examples:
  imagic bench shapes --cases 80 --seeds 0,1,2 --out bench/shapes
  imagic bench shapes --from-case 16 --cases 40 --methods imagic-inversion \\
      --guidance 1,1.5,2 --seeds 0 --out bench/guidance   (stages 1-2 fitted once per case)"""
TEDBENCH_EXAMPLE = """example:
  imagic bench tedbench --data tedbench --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --eta auto --seeds 0,1 --out bench/tedbench"""


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    bench = sub.add_parser("bench", help="measure edit quality (ShapesBench, TEdBench)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))

    shapes = bench_sub.add_parser(
        "shapes", help="Imagic vs its ablations, SDEdit and text-only on ShapesWorld",
        description="Run ShapesBench: for each case (an input render and a caption that changes "
                    "one attribute) and seed, every method and parameter; rows.csv (resumable: "
                    "finished cases are not redone), summary.md and tradeoff.png in --out. The "
                    "model's world sets the cases: ShapesBench on a 32 px ShapesWorld model, "
                    "ShapesBench 2 (colour, position, pose, add, remove) on a 128 px ShapesWorld "
                    "2 cascade.",
        epilog=SHAPES_EXAMPLE, formatter_class=raw,
    )
    shapes.add_argument("--cases", type=int, default=80,
                        help="run cases 0 … N−1 (default 80); with --from-case, N is the end "
                             "of the range")
    shapes.add_argument("--from-case", type=int, default=0,
                        help="skip the cases before this index (default 0)")
    shapes.add_argument("--held-out", action="store_true",
                        help="ShapesBench 2: the held-out cases (default: the tuning cases)")
    shapes.add_argument("--seeds", type=parse_seeds, default=(0, 1, 2),
                        help="seeds of stages 1-3, one fit each (default 0,1,2)")
    shapes.add_argument("--out", default="bench-shapes", help="output folder")
    shapes.add_argument("--model", help="a ShapesWorld model folder (default: the embedded one)")
    shapes.add_argument("--eta", type=parse_etas, help="η sweep (default 0:1.2:0.1)")
    shapes.add_argument("--strengths", type=parse_etas,
                        help="SDEdit strengths (default 0.3:0.9:0.1)")
    shapes.add_argument("--methods", type=lambda text: tuple(dict.fromkeys(
                            m.strip() for m in text.split(",") if m.strip())),
                        help="comma-separated subset of: imagic, imagic-auto, no-finetune, "
                             "no-embedding, sdedit, text-only (default: these six, and on a "
                             "cascade no-sr-finetune), and on request imagic-inversion (stage 3 "
                             "from the input's inversion), imagic-vp (Forgedit's vector "
                             "projection), imagic-attention (AID), forget-STRATEGY (Forgedit's "
                             "forgetting, e.g. forget-decoderkv) and imagic-auto-forget (auto-η's "
                             "pick of η and forgetting): these re-render Imagic's session")
    shapes.add_argument("--guidance", dest="guidances", type=parse_floats,
                        help="classifier-free guidance of every method (default: 4 on "
                             "ShapesBench, the model's training default; the preset's on "
                             "ShapesBench 2); several (1,1.5,2) sample every method at each "
                             "from one fit, in rows named METHOD-gG")
    shapes.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    recipe_options(shapes, leave_out=("seed",))  # each bench seed is also its training seed
    _sampling(shapes, leave_out=("guidance",))  # its own --guidance takes several
    shapes.set_defaults(func=cmd_shapes)

    ted = bench_sub.add_parser(
        "tedbench", help="TEdBench: CLIP score and 1-LPIPS over η on real image-text pairs",
        description="Run Imagic on every pair of a TEdBench folder (input_list.json and "
                    "originals/) and seed, render every η, and score each output with CLIP score "
                    "(text alignment) and 1-LPIPS to the input (fidelity). Writes rows.csv "
                    "(resumable), summary.md, curve.png and the images to --out.",
        epilog=TEDBENCH_EXAMPLE, formatter_class=raw,
    )
    ted.add_argument("--data", required=True, help="TEdBench folder: input_list.json, originals/")
    model_options(ted)
    ted.add_argument("--eta", type=parse_eta_or_auto, default="auto",
                     help="η sweep, e.g. 0:1.2:0.1, or auto (default: sweep 0.4:1.2:0.1 and "
                          "mark the η auto-η picks)")
    ted.add_argument("--seeds", type=parse_seeds, default=(0,),
                     help="seeds of stages 1-3, one fit each (default 0)")
    ted.add_argument("--out", default="bench-tedbench", help="output folder")
    ted.add_argument("--clip-model", default=None,
                     help="CLIP weights for CLIP score: hub id or folder "
                          "(default openai/clip-vit-large-patch14)")
    ted.add_argument("--limit", type=int, help="only the first N pairs")
    ted.add_argument("--keep-sessions", action="store_true",
                     help="save each fitted session under OUT/sessions/")
    ted.add_argument("--quiet", action="store_true", help="no progress bar")
    recipe_options(ted, leave_out=("seed",))
    _sampling(ted, leave_out=("start",))
    ted.set_defaults(func=cmd_tedbench)

    merge = bench_sub.add_parser(
        "merge", help="merge ShapesBench runs made side by side into one run folder",
        description="Each worker ran `imagic bench shapes` on its own copy of RUN (run.json and "
                    "rows.csv copied in first), e.g. on disjoint --from-case/--cases ranges. "
                    "Their new rows are added to RUN, and its summary.md and tradeoff.png "
                    "rewritten.",
        epilog="example:\n  imagic bench merge bench/shapes runs/w1 runs/w2", formatter_class=raw,
    )
    merge.add_argument("run", type=Path, help="the run folder to merge into")
    merge.add_argument("workers", type=Path, nargs="+", help="the workers' run folders")
    merge.set_defaults(func=cmd_merge)

    tables = bench_sub.add_parser(
        "tables", help="print the ShapesBench tables docs/RESULTS.md quotes",
        description="From one or more rows.csv read together: the best setting per method and "
                    "kind, each method along its parameter, the SDEdit bar per kind and per "
                    "seed, and fidelity per seed. Only (case, seed) pairs that every method "
                    "finished are counted.",
        epilog="example:\n  imagic bench tables docs/bench/shapes-run4/rows.csv --seeds 0",
        formatter_class=raw,
    )
    tables.add_argument("rows", type=Path, nargs="+", help="rows.csv files, read together")
    tables.add_argument("--seeds", type=parse_seeds, help="only these seeds, e.g. 0 or 0,1")
    tables.set_defaults(func=cmd_tables)

    score = bench_sub.add_parser(
        "score-edit", help="score an edit of a shipped example image with the detectors",
        description="Read OUT/manifest.json (written by `imagic edit` on one of examples/), and "
                    "print per output the attributes read, the others kept, the input's pebbles "
                    "kept and the background PSNR, then the counts.",
        epilog="example:\n  make edit && .venv/bin/imagic bench score-edit imagic-out",
        formatter_class=raw,
    )
    score.add_argument("out", type=Path, nargs="?", default=Path("imagic-out"),
                       help="the edit's output folder (default imagic-out)")
    score.set_defaults(func=cmd_score_edit)


def _sampling(p, leave_out: tuple[str, ...]) -> None:
    """Stage 3's sampling options but those in `leave_out`, as overrides of the preset."""
    from .options import add_options

    add_options(p, SAMPLING, leave_out)


def _recipe(args, preset: str | None, **fixed):
    """The preset (`preset` when --preset is not given) with the options given, and `fixed`."""
    from ..errors import InputError
    from ..presets import get_preset

    options = {**options_given(args, RECIPE, SAMPLING), **fixed}
    if options.get("forget") == "auto":  # rows are per (method, η): one strategy at a time
        raise InputError("a benchmark renders one forgetting strategy: give one with --forget "
                         "(ShapesBench's imagic-auto-forget method picks among them)")
    return get_preset(args.preset or preset).with_options(low_memory=args.low_memory, **options)


def _shapes_recipe(args, preset: str, protocol: bool):
    """A ShapesBench run's recipe: `preset` (or --preset) with the options given. Where they are
    silent, ShapesBench keeps its protocol (`protocol`: the paper's fresh noise at guidance 4;
    imagic-inversion starts from the inversion) and ShapesBench 2 runs the preset as an edit
    does, from its own start at its own guidance."""
    from ..bench.shapes import GUIDANCE

    fixed = {}
    if args.guidances:
        fixed["guidance"] = args.guidances[0]
    elif protocol:
        fixed["guidance"] = GUIDANCE
    if protocol and args.start is None:
        fixed["start"] = "noise"
    return _recipe(args, preset, **fixed)


def cmd_shapes(args) -> int:
    from ..backends import load_backend, require_family
    from ..bench import require_plotting, shapes, shapes2
    from ..bench.shapes import ETAS, STRENGTHS, check_settings, run
    from ..errors import InputError
    from ..outputs import check_out_dir

    shapes.select_cases(args.cases, args.from_case)  # impossible ranges fail now
    config = _shapes_recipe(args, "shapes", protocol=True)
    etas, strengths = args.eta or ETAS, args.strengths or STRENGTHS
    guidances = args.guidances or (config.guidance,)
    check_settings(config, etas, strengths, args.methods or shapes.METHODS,
                   guidances if len(guidances) > 1 else ())
    require_plotting()
    out = check_out_dir(args.out)
    backend = load_backend(args.model, device=args.device)
    require_family(backend, "pixel-cascade", "ShapesBench (ShapesWorld renders)")
    # the world is the one whose images the model makes
    if backend.output_resolution == 128:
        cases = shapes2.select_cases(args.cases, args.from_case, held_out=args.held_out)
        methods = args.methods or shapes2.METHODS2
    elif backend.output_resolution == 32 and not args.held_out:
        cases, methods = shapes.select_cases(args.cases, args.from_case), args.methods
        methods = methods or shapes.METHODS
    else:
        raise InputError("ShapesBench needs a ShapesWorld model (32 px; --held-out: a 128 px "
                         f"ShapesWorld 2 cascade); this one makes {backend.output_resolution} "
                         "px images")
    config = _shapes_recipe(args, backend.default_preset,
                            protocol=backend.output_resolution == 32)
    guidances = args.guidances or (config.guidance,)
    path = run(backend, out, cases, args.seeds, config, etas=etas, strengths=strengths,
               methods=methods, quiet=args.quiet, guidances=guidances)
    if not args.quiet:
        print((out / "summary.md").read_text())
        print(f"rows: {path}; plot: {out / 'tradeoff.png'}")
    return 0


def cmd_tedbench(args) -> int:
    from ..backends import PHOTO_FAMILIES, require_family, resolve_device
    from ..batch import process_slot
    from ..bench import require_plotting
    from ..bench.tedbench import DEFAULT_CLIP, check_settings, load_metrics, read_pairs, run
    from ..outputs import check_out_dir
    from ..presets import DEFAULT_PRESET

    # Check the data, the metric weights and the numbers before loading the model
    read_pairs(args.data)
    check_settings(args.model, args.limit)
    _recipe(args, DEFAULT_PRESET)  # impossible numbers fail now
    require_plotting()
    out = check_out_dir(args.out)
    # under `accelerate launch`, one model per process, on its own GPU (imagic.batch)
    rank, args.device = process_slot(args.device)
    metrics = load_metrics(args.clip_model or DEFAULT_CLIP, resolve_device(args.device))
    backend = load_model(args, args.model)
    require_family(backend, PHOTO_FAMILIES, "TEdBench (photos)")
    config = _recipe(args, backend.default_preset)
    path = run(backend, args.data, out, config, metrics, seeds=args.seeds, etas=args.eta,
               keep_sessions=args.keep_sessions, limit=args.limit, quiet=args.quiet,
               rank=rank)
    if not args.quiet and rank == 0:
        print((out / "summary.md").read_text())
        print(f"rows: {path}; plot: {out / 'curve.png'}; images: {out / 'images'}")
    return 0


def cmd_merge(args) -> int:
    from ..bench import require_plotting
    from ..bench.shapes import merge_runs

    require_plotting()
    added = merge_runs(args.run, args.workers)
    print(f"{args.run}: {added} rows added; summary.md and tradeoff.png rewritten")
    return 0


def cmd_tables(args) -> int:
    from ..bench.tables import tables

    print(tables(args.rows, set(args.seeds) if args.seeds else None), end="")
    return 0


def cmd_score_edit(args) -> int:
    from ..bench.shapes import score_edit

    print(score_edit(args.out))
    return 0
