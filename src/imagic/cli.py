"""The `imagic` command: parse, call the public API, print. No algorithm lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from .bench import require_family, require_plotting
from .errors import ImagicError, InputError
from .presets import SAMPLERS, STARTS

EDIT_EXAMPLE = """example:
  imagic edit dog.png "a photo of a sitting dog" \\
      --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --eta 0.6:0.8:0.1 --seeds 0,1 --out dog-sitting
  (then re-render other η and seeds instantly: imagic generate dog-sitting/session --eta 0.9)"""
GENERATE_EXAMPLE = """example:
  imagic generate dog-sitting/session --eta 0.5,0.9 --seeds 3,4 --out dog-more"""
INFO_EXAMPLE = """example:
  imagic info stable-diffusion-v1-5/stable-diffusion-v1-5"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exit status 2, like argparse)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        if message.startswith("argument --eta: expected one argument"):
            # argparse reads "--eta -0.5,0.5" as --eta followed by an option named -0.5,0.5
            message += " (for a list that starts below 0 write --eta=-0.5,0.5)"
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------ argument types


def parse_eta_or_auto(text: str) -> tuple[float, ...] | str:
    """parse_etas, or 'auto': sweep imagic.auto_eta.AUTO_ETAS and pick one η per seed."""
    return "auto" if text.strip().lower() == "auto" else parse_etas(text)


def parse_etas(text: str) -> tuple[float, ...]:
    """'0.6,0.7,0.8' or 'start:stop:step' (stop included), each η in [−1, 2]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step + 1e-9)) + 1
            etas = tuple(round(start + i * step, 6) for i in range(count))
        else:
            etas = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"η must be numbers like 0.6,0.7 or a range like 0.5:1.0:0.1, got {text!r}"
        ) from None
    if not etas:
        raise argparse.ArgumentTypeError("give at least one η")
    for eta in etas:
        if not -1.0 <= eta <= 2.0:
            raise argparse.ArgumentTypeError(f"η must lie in [-1, 2], got {eta:g}")
    return etas


def parse_methods(text: str) -> tuple[str, ...]:
    """'imagic,sdedit': a subset of ShapesBench's methods, each named once."""
    from .bench.shapes import METHODS, OPTIONAL_METHODS

    known = METHODS + OPTIONAL_METHODS
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or '(none)'}: choose from {', '.join(known)}"
        )
    return tuple(dict.fromkeys(methods))


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' or 'first:last' (both included); integers only."""
    try:
        if ":" in text:
            first, last = (int(x) for x in text.split(":"))
            seeds = tuple(range(first, last + 1))
        else:
            seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers like 0,1,2 or a range like 0:3, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    seeds = tuple(dict.fromkeys(seeds))  # each seed once, in the order given
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise argparse.ArgumentTypeError("seeds must be between 0 and 2^63 - 1")
    return seeds


# ------------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .presets import DEFAULT_PRESET, PRESETS

    parser = _Parser(
        prog="imagic",
        description="Edit one real image to match a text (Imagic, Kawar et al., CVPR 2023).",
    )
    parser.add_argument("--version", action="version", version=f"imagic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_options(p, with_model=True):
        if with_model:
            p.add_argument("--model", help="hub id, diffusers folder, or .safetensors file")
        p.add_argument("--config", help="diffusers folder with the configs of a single-file model "
                                        "(needed offline)")
        p.add_argument("--revision", help="hub revision (branch, tag or commit)")
        p.add_argument("--allow-pickle", action="store_true",
                       help="allow pickled checkpoints (.ckpt/.bin/.pt); they can run code")
        p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
        p.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "bfloat16", "float16"],
                       help="precision of frozen parts and autocast on CUDA "
                            "(auto: bf16 on CUDA; the CPU runs float32 only)")

    def stage3_options(p, out_help):
        p.add_argument("--eta", type=parse_eta_or_auto,
                       help="η values: 0.6,0.7 or 0.5:1.0:0.1, or auto (sweep 0.4:1.2:0.1 and "
                            "pick one per seed, written as auto_seedS.png)")
        p.add_argument("--seeds", type=parse_seeds, help="sampling seeds: 0,1,2 or 0:3")
        p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
        p.add_argument("--sample-steps", type=int,
                       help="sampling steps (default: the preset's or the session's)")
        p.add_argument("--sampler", choices=SAMPLERS,
                       help="stage 3's solver: ddim (the paper's) or dpm++ (DPM-Solver++ 2M: "
                            "use ~20 steps); default: the preset's or the session's")
        p.add_argument("--start", choices=STARTS,
                       help="where sampling starts: noise (the paper: fresh noise per seed) or "
                            "inversion (the input's own noise, found by running DDIM backwards: "
                            "keeps its details; one image per η); default: the preset's or the "
                            "session's")
        p.add_argument("--out", help=out_help)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    edit = sub.add_parser(
        "edit", help="fit an image to a text (stages 1-2) and render edits (stage 3)",
        description="Edit IMAGE to match TEXT. Writes one PNG per (η, seed), grid.png and "
                    "manifest.json to --out, and the reusable session to --session.",
        epilog=EDIT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edit.add_argument("image", help="the photo to edit")
    edit.add_argument("text", help='the target text, e.g. "a photo of a sitting dog"')
    model_options(edit)
    edit.add_argument("--preset", default=None,
                      help=f"recipe: {', '.join(sorted(PRESETS))} (default: the model's own, "
                           f"{DEFAULT_PRESET} for Stable Diffusion, shapes for the embedded one)")
    stage3_options(edit, "output folder (default: imagic-out)")
    edit.add_argument("--session", help="where to save the session (default: OUT/session)")
    edit.add_argument("--no-session", action="store_true", help="do not save the session")
    edit.add_argument("--pad", action="store_true",
                      help="letterbox a non-square image instead of centre-cropping it")
    edit.add_argument("--finetune", choices=["full", "lora"],
                      help="stage 2: all UNet weights or a LoRA adapter")
    edit.add_argument("--lora-rank", type=int, help="LoRA rank (with --finetune lora)")
    edit.add_argument("--low-memory", action="store_true",
                      help="stage 2 trains a LoRA adapter instead of every weight, and both "
                           "stages use gradient checkpointing: far less GPU memory, not the "
                           "paper's recipe")
    edit.add_argument("--embed-steps", type=int, help="stage 1 steps")
    edit.add_argument("--embed-lr", type=float, help="stage 1 learning rate")
    edit.add_argument("--finetune-steps", type=int, help="stage 2 steps")
    edit.add_argument("--finetune-lr", type=float, help="stage 2 learning rate (full)")
    edit.add_argument("--lora-lr", type=float, help="stage 2 learning rate (LoRA)")
    edit.add_argument("--timesteps-per-step", type=int,
                      help="K: (t, ε) draws per optimizer step, both stages")
    edit.add_argument("--finetune-timesteps-per-step", type=int,
                      help="K for stage 2 only (after --timesteps-per-step)")
    edit.add_argument("--seed", type=int, help="seed of the training draws (stages 1-2)")
    edit.add_argument("--cuda-graphs", choices=CUDA_GRAPHS,
                      help="stages 1-2 on a GPU: record each training step once as a CUDA "
                           "graph and replay it (faster, more memory: on an H100 the fast "
                           "preset took 38 s instead of 47, reserving 38 GiB instead of 22). "
                           "auto: where at least 40 GiB can be used (the fast preset); "
                           "default: the preset's")
    edit.set_defaults(func=cmd_edit)

    gen = sub.add_parser(
        "generate", help="render new η and seeds from a saved session, without training",
        description="Render SESSION (made by `imagic edit`) at new η and seeds.",
        epilog=GENERATE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("session", help="a session folder written by `imagic edit`")
    model_options(gen)
    stage3_options(gen, "output folder (default: SESSION-render-N beside the session, "
                        "the first N not taken)")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser(
        "info", help="describe a model: resolution, prediction type, parameter counts",
        epilog=INFO_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("model", nargs="?", default=None,
                      help="hub id, diffusers folder or .safetensors file")
    model_options(info, with_model=False)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="measure edit quality (ShapesBench, TEdBench)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    shapes = bench_sub.add_parser(
        "shapes", help="Imagic vs its ablations, SDEdit and text-only on ShapesWorld",
        description="Run ShapesBench: for each case (an input render and a caption that changes "
                    "one attribute) and seed, every method and parameter; rows.csv (resumable: "
                    "finished cases are not redone), summary.md and tradeoff.png in --out.",
        epilog="example:\n  imagic bench shapes --cases 80 --seeds 0,1,2 --out bench/shapes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shapes.add_argument("--cases", type=int, default=80,
                        help="run cases 0 … N−1 (default 80); with --from-case, N is the end "
                             "of the range")
    shapes.add_argument("--from-case", type=int, default=0,
                        help="skip the cases before this index (default 0), e.g. to hold out "
                             "--from-case 16 --cases 32")
    shapes.add_argument("--seeds", type=parse_seeds, default=(0, 1, 2), help="default 0,1,2")
    shapes.add_argument("--out", default="bench-shapes", help="output folder")
    shapes.add_argument("--model", help="a ShapesWorld model folder (default: the embedded one)")
    shapes.add_argument("--preset", default="shapes", help="Imagic recipe (default: shapes)")
    shapes.add_argument("--eta", type=parse_etas, help="η sweep (default 0:1.2:0.1)")
    shapes.add_argument("--strengths", type=parse_etas,
                        help="SDEdit strengths (default 0.3:0.9:0.1)")
    shapes.add_argument("--methods", type=parse_methods,
                        help="comma-separated subset of: imagic, imagic-auto, no-finetune, "
                             "no-embedding, sdedit, text-only (default: these six), and "
                             "imagic-inversion (stage 3 from the input's inversion; on request)")
    shapes.add_argument("--embed-steps", type=int, help="override the preset's stage 1 steps")
    shapes.add_argument("--finetune-steps", type=int, help="override the preset's stage 2 steps")
    shapes.add_argument("--embed-lr", type=float, help="override the preset's stage 1 lr")
    shapes.add_argument("--finetune-lr", type=float, help="override the preset's stage 2 lr")
    shapes.add_argument("--timesteps-per-step", type=int,
                        help="override the preset's K (both stages)")
    shapes.add_argument("--finetune-timesteps-per-step", type=int,
                        help="K for stage 2 only (after --timesteps-per-step)")
    shapes.add_argument("--sample-steps", type=int, help="override the preset's sampling steps")
    shapes.add_argument("--sampler", choices=SAMPLERS, help="override the preset's sampler")
    shapes.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale of every method (default 4, the "
                             "model's training default, at which docs/RESULTS.md was measured)")
    shapes.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.set_defaults(func=cmd_bench_shapes)

    ted = bench_sub.add_parser(
        "tedbench", help="TEdBench: CLIP score and 1-LPIPS over η on real image-text pairs",
        description="Run Imagic on every pair of a TEdBench folder (input_list.json and "
                    "originals/) and seed, render every η, and score each output with CLIP score "
                    "(text alignment) and 1-LPIPS to the input (fidelity). Writes rows.csv "
                    "(resumable), summary.md, curve.png and the images to --out.",
        epilog="example:\n  imagic bench tedbench --data tedbench --model "
               "stable-diffusion-v1-5/stable-diffusion-v1-5 --eta auto --seeds 0,1 "
               "--out bench/tedbench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ted.add_argument("--data", required=True, help="TEdBench folder: input_list.json, originals/")
    model_options(ted)
    ted.add_argument("--preset", default=None, help="Imagic recipe (default: the model's own)")
    ted.add_argument("--eta", type=parse_eta_or_auto, default="auto",
                     help="η sweep, e.g. 0:1.2:0.1, or auto (default: sweep 0.4:1.2:0.1 and "
                          "mark the η auto-η picks)")
    ted.add_argument("--seeds", type=parse_seeds, default=(0,), help="default 0")
    ted.add_argument("--out", default="bench-tedbench", help="output folder")
    ted.add_argument("--clip-model", default=None,
                     help="CLIP weights for CLIP score: hub id or folder "
                          "(default openai/clip-vit-large-patch14)")
    ted.add_argument("--limit", type=int, help="only the first N pairs")
    ted.add_argument("--keep-sessions", action="store_true",
                     help="save each fitted session under OUT/sessions/")
    ted.add_argument("--embed-steps", type=int, help="override the preset's stage 1 steps")
    ted.add_argument("--finetune-steps", type=int, help="override the preset's stage 2 steps")
    ted.add_argument("--sample-steps", type=int, help="override the preset's sampling steps")
    ted.add_argument("--sampler", choices=SAMPLERS, help="override the preset's sampler")
    ted.add_argument("--quiet", action="store_true", help="no progress bar")
    ted.set_defaults(func=cmd_bench_tedbench)

    from .shapes.train import add_cli as add_shapes_commands

    add_shapes_commands(sub)  # train-shapes, eval-shapes
    return parser


# ------------------------------------------------------------------------ commands

CUDA_GRAPHS = {"auto": None, "on": True, "off": False}  # --cuda-graphs -> EditConfig.cuda_graphs
CONFIG_FLAGS = {  # CLI attribute -> EditConfig field
    "finetune": "finetune", "lora_rank": "lora_rank", "embed_steps": "embed_steps",
    "embed_lr": "embed_lr", "finetune_steps": "finetune_steps", "finetune_lr": "finetune_lr",
    "lora_lr": "lora_lr", "timesteps_per_step": "timesteps_per_step",
    "finetune_timesteps_per_step": "finetune_timesteps_per_step", "seed": "seed",
    "eta": "etas", "seeds": "seeds", "guidance": "guidance", "sample_steps": "sample_steps",
    "sampler": "sampler", "start": "start",
}


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """A folder that can be written, checked before anything costly runs: it is a folder or
    can be made one (no file on the way), and it is writable. Nothing is created here."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} is a file; choose a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {out}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: {existing} is not writable")
    if flag == "--out" and (out / "delta.safetensors").exists():
        raise InputError(f"--out {out} holds a session; choose another folder")
    return out


def check_session_dir(path: Path, out: Path) -> Path:
    """Where `edit` saves the session: writable, not a folder of something else, and not the
    --out folder itself (both hold a manifest.json)."""
    from .session import EditSession

    check_out_dir(path, "--session")
    if path.resolve() == out.resolve():
        raise InputError("--session and --out are the same folder; the session needs its own "
                         "(default: OUT/session)")
    EditSession.check_destination(path)
    return path


def next_render_dir(session: Path) -> Path:
    """generate's default --out: SESSION-render-N beside the session, the first N not taken,
    so a re-render never writes over the edit's outputs or an earlier re-render."""
    n = 1
    while (session.parent / f"{session.name}-render-{n}").exists():
        n += 1
    return session.parent / f"{session.name}-render-{n}"


def _load(args, model, config=None, revision=None):
    from .backends import load_backend

    return load_backend(model, device=args.device, dtype=args.dtype,
                        allow_pickle=args.allow_pickle, config=args.config or config,
                        revision=args.revision or revision)


def cmd_edit(args) -> int:
    from .auto_eta import AUTO_ETAS, choose_etas
    from .editor import Imagic
    from .images import file_sha256, load_image
    from .presets import DEFAULT_PRESET, get_preset, low_memory

    # 1. Check every input before loading anything heavy
    image = load_image(args.image)
    if not " ".join(args.text.split()):
        raise InputError("the target text is empty: say what the edited image should show")
    out = check_out_dir(args.out or "imagic-out")
    if args.no_session and args.session:
        raise InputError("--session and --no-session contradict each other; give one")
    session_dir = None if args.no_session else check_session_dir(
        Path(args.session or out / "session"), out)
    overrides = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
                 if getattr(args, flag) is not None}
    if args.eta == "auto":
        overrides["etas"] = AUTO_ETAS
    if args.cuda_graphs is not None:
        overrides["cuda_graphs"] = CUDA_GRAPHS[args.cuda_graphs]
    if args.timesteps_per_step is not None and args.finetune_timesteps_per_step is None:
        overrides["finetune_timesteps_per_step"] = None  # one K for both stages, as asked
    if args.low_memory and args.finetune == "full":
        raise InputError("--low-memory trains a LoRA adapter: drop --finetune full")
    lora = args.low_memory or args.finetune == "lora"  # every preset fine-tunes in full
    if not lora and (args.lora_rank is not None or args.lora_lr is not None):
        raise InputError("--lora-rank and --lora-lr set a LoRA stage 2: add --finetune lora "
                         "(or --low-memory), or drop them")
    if lora and args.finetune_lr is not None:
        raise InputError("--finetune-lr is the full fine-tune's rate; a LoRA stage 2 uses "
                         "--lora-lr")
    if args.preset is not None:
        get_preset(args.preset)  # an unknown name fails before the model loads
    replace(get_preset(DEFAULT_PRESET), **overrides)  # so do impossible numbers
    # 2. Load the model (its own preset unless --preset), fit (stages 1-2), generate (stage 3)
    backend = _load(args, args.model)
    preset = get_preset(args.preset or backend.default_preset)
    overrides["seeds"] = seeds_for(args, preset.seeds)
    config = replace(low_memory(preset) if args.low_memory else preset, **overrides)
    editor = Imagic(backend, config, quiet=args.quiet)
    session = editor.fit(image, args.text, image_sha256=file_sha256(args.image), pad=args.pad)
    # 3. Write: the session folder first (the costly part, kept even if sampling fails), then
    #    stage 3, auto-η's scoring, and the images, grid and manifest into --out
    if session_dir is not None:
        session.save(session_dir)
    results = editor.generate(session)
    choices = choose_etas(backend, session, results) if args.eta == "auto" else None
    write_outputs(out, session, results, config.etas, config.seeds,
                  {"command": "edit", "image": str(Path(args.image).resolve()),
                   "session": str(session_dir) if session_dir else None}, choices)
    _say(args, out, results, session_dir, choices)
    if not args.quiet:
        print(time_and_memory(session.timings))
    return 0


def seeds_for(args, default: tuple[int, ...]) -> tuple[int, ...]:
    """--seeds, else the preset's or session's; with --start inversion only the first of those,
    since every seed would give the same picture."""
    if args.seeds is not None:
        return tuple(args.seeds)
    return default[:1] if args.start == "inversion" else default


def time_and_memory(timings: dict[str, float]) -> str:
    """One line for the end of an edit: each stage's seconds and, on a GPU, the peak memory
    (the largest of the stages' `torch.cuda.max_memory_allocated`)."""
    stages = [("stage1", "stage 1"), ("stage2", "stage 2"), ("generate", "stage 3")]
    line = "time: " + ", ".join(f"{label} {timings[f'{key}_s']:.1f} s"
                                for key, label in stages if f"{key}_s" in timings)
    peaks = [v for k, v in timings.items() if k.endswith("_peak_gib")]
    return line + (f"; peak GPU memory {max(peaks):.1f} GiB" if peaks else "")


def cmd_generate(args) -> int:
    from .auto_eta import AUTO_ETAS, choose_etas
    from .editor import Imagic
    from .session import EditSession

    session = EditSession.load(args.session)
    out = check_out_dir(args.out or next_render_dir(Path(args.session)))
    if out.resolve() == Path(args.session).resolve():
        raise InputError("--out is the session folder; choose another (default: "
                         "SESSION-render-N beside it)")
    etas = AUTO_ETAS if args.eta == "auto" else args.eta or session.config.etas
    seeds = seeds_for(args, session.config.seeds)
    stage3 = {k: v for k, v in (("guidance", args.guidance), ("sample_steps", args.sample_steps),
                                 ("sampler", args.sampler), ("start", args.start))
              if v is not None}
    # impossible combinations (several seeds for a session that starts from its inversion)
    # fail before the model loads
    replace(session.config, etas=tuple(etas), seeds=tuple(seeds), **stage3)
    if args.model:
        backend = _load(args, args.model)
    else:  # the session's own model, as it was loaded: revision and single-file configs too
        saved = session.model
        backend = _load(args, saved.get("source"), saved.get("config"), saved.get("revision"))
    session.check_model(backend)
    editor = Imagic(backend, session.config, quiet=args.quiet)
    results = editor.generate(session, etas, seeds, args.guidance, args.sample_steps,
                              args.sampler, args.start)
    choices = choose_etas(backend, session, results) if args.eta == "auto" else None
    write_outputs(out, session, results, etas, seeds,
                  {"command": "generate", "session": str(Path(args.session).resolve())},
                  choices, stage3,
                  {k: v for k, v in session.timings.items() if k.startswith("generate_")})
    _say(args, out, results, None, choices)
    return 0


def cmd_info(args) -> int:
    backend = _load(args, args.model)
    info = backend.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                              for k, v in value.items())
        print(f"{key:16} {value}")
    return 0


def cmd_bench_shapes(args) -> int:
    from .backends import load_backend
    from .bench.shapes import ETAS, GUIDANCE, METHODS, STRENGTHS, make_cases, run
    from .presets import get_preset

    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    if not 0 <= args.from_case < args.cases:
        raise InputError(f"--from-case must lie in [0, --cases), got {args.from_case}")
    if args.strengths and not all(0 < s <= 1 for s in args.strengths):
        raise InputError(f"SDEdit strengths lie in (0, 1], got {list(args.strengths)}")
    require_plotting()
    out = check_out_dir(args.out)
    overrides = {k: v for k, v in (("embed_steps", args.embed_steps),
                                   ("finetune_steps", args.finetune_steps),
                                   ("embed_lr", args.embed_lr),
                                   ("finetune_lr", args.finetune_lr),
                                   ("sample_steps", args.sample_steps),
                                   ("sampler", args.sampler)) if v is not None}
    if args.timesteps_per_step is not None:
        overrides.update(timesteps_per_step=args.timesteps_per_step,
                         finetune_timesteps_per_step=None)
    if args.finetune_timesteps_per_step is not None:
        overrides["finetune_timesteps_per_step"] = args.finetune_timesteps_per_step
    # ShapesBench sets stage 3's start per method ("imagic" is the paper's fresh noise), and
    # samples every method at the protocol's guidance, not the preset's, unless told otherwise
    guidance = GUIDANCE if args.guidance is None else args.guidance
    config = replace(get_preset(args.preset), start="noise", guidance=guidance, **overrides)
    if "imagic-inversion" in (args.methods or ()) and config.sampler != "ddim":
        raise InputError("imagic-inversion runs DDIM backwards from the input, so it samples "
                         "with ddim; drop it from --methods or use --sampler ddim")
    backend = load_backend(args.model, device=args.device)
    require_family(backend, "pixel-cascade", "ShapesBench (32×32 ShapesWorld renders)")
    cases = make_cases(args.cases)[args.from_case:]
    path = run(backend, out, cases, args.seeds, config, etas=args.eta or ETAS,
               strengths=args.strengths or STRENGTHS, methods=args.methods or METHODS,
               quiet=args.quiet)
    if not args.quiet:
        print((out / "summary.md").read_text())
        print(f"rows: {path}; plot: {out / 'tradeoff.png'}")
    return 0


def cmd_bench_tedbench(args) -> int:
    from .backends import resolve_device
    from .bench.tedbench import DEFAULT_CLIP, load_metrics, read_pairs, run
    from .presets import DEFAULT_PRESET, get_preset

    # Check the data, the metric weights and the numbers before loading the model
    read_pairs(args.data)
    if args.model is None:  # the embedded 32×32 ShapesWorld model cannot edit photos
        raise InputError("TEdBench edits photos: name a Stable Diffusion model with --model")
    require_plotting()
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    out = check_out_dir(args.out)
    overrides = {k: v for k, v in (("embed_steps", args.embed_steps),
                                   ("finetune_steps", args.finetune_steps),
                                   ("sample_steps", args.sample_steps),
                                   ("sampler", args.sampler)) if v is not None}
    replace(get_preset(args.preset or DEFAULT_PRESET), **overrides)  # impossible numbers fail now
    metrics = load_metrics(args.clip_model or DEFAULT_CLIP, resolve_device(args.device))
    backend = _load(args, args.model)
    require_family(backend, "stable-diffusion", "TEdBench (photos)")
    config = replace(get_preset(args.preset or backend.default_preset), **overrides)
    path = run(backend, args.data, out, config, metrics, seeds=args.seeds, etas=args.eta,
               keep_sessions=args.keep_sessions, limit=args.limit, quiet=args.quiet)
    if not args.quiet:
        print((out / "summary.md").read_text())
        print(f"rows: {path}; plot: {out / 'curve.png'}; images: {out / 'images'}")
    return 0


def write_outputs(out: Path, session, results, etas, seeds, extra: dict, choices=None,
                  stage3: dict | None = None, timings: dict | None = None) -> None:
    """One PNG per (η, seed), grid.png and manifest.json, each written atomically; with auto-η
    `choices` also auto_seedS.png (the chosen image) and the signals behind each choice.
    `stage3`: sampling settings that differ from the session's (guidance, steps, sampler, start);
    `timings`: this run's (default: the session's, every stage of an edit)."""
    from .images import make_grid, save_atomic, write_text_atomic
    from .session import library_versions

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for r in results:
        name = f"eta{r.eta:.2f}_seed{r.seed}.png"
        save_atomic(r.image, out / name)
        files.append({"file": name, "eta": r.eta, "seed": r.seed})
    for seed, choice in (choices or {}).items():
        chosen = next(r for r in results if r.seed == seed and r.eta == choice.eta)
        save_atomic(chosen.image, out / f"auto_seed{seed}.png")
        files.append({"file": f"auto_seed{seed}.png", "eta": choice.eta, "seed": seed,
                      "auto": True})
    start = (stage3 or {}).get("start", session.config.start)
    grid = make_grid(session.input_image, {(r.seed, r.eta): r.image for r in results},
                     seeds, etas, title=session.text,
                     row_labels=["inversion"] if start == "inversion" else None)
    save_atomic(grid, out / "grid.png")
    manifest = {
        **extra,
        "text": session.text,
        "input_sha256": session.image_sha256,
        "model": session.model,
        "config": {**session.config.to_dict(), **(stage3 or {}), "etas": list(etas),
                   "seeds": list(seeds)},
        "images": files,
        **({"auto_eta": [c.to_dict() for c in choices.values()]} if choices else {}),
        "grid": "grid.png",
        "timings": {k: round(v, 3) for k, v in (timings or session.timings).items()},
        "versions": library_versions(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(json.dumps(manifest, indent=2) + "\n", out / "manifest.json")


def _say(args, out: Path, results, session_dir, choices=None) -> None:
    if args.quiet:
        return
    print(f"wrote {len(results)} image(s), grid.png and manifest.json to {out}")
    for seed, choice in (choices or {}).items():
        print(f"auto-η: seed {seed} → η {choice.eta:g} ({out / f'auto_seed{seed}.png'})")
    if session_dir is not None:
        print(f"session saved to {session_dir}; re-render with "
              f"`imagic generate {session_dir} --eta ...`")


# ------------------------------------------------------------------------ entry point


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"imagic: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad argument (status 2, one line)
        return int(done.code or 0)
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        if getattr(args, "quiet", True):
            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()  # its "Loading weights" bar
        return args.func(args)
    except ImagicError as err:
        print(f"imagic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagic: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        import torch  # loaded by now: only a model's work runs out of memory

        if not isinstance(err, torch.OutOfMemoryError):
            raise
        print(f"imagic: error: the GPU ran out of memory ({str(err).splitlines()[0]}); "
              "--low-memory needs about half as much, and --cuda-graphs off less than on",
              file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
