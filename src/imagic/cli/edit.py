"""`imagic edit`, `imagic generate` and `imagic info`."""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

from .options import (
    RECIPE,
    SAMPLING,
    load_model,
    model_options,
    options_given,
    recipe_options,
    stage3_options,
)

EDIT_EXAMPLE = """example:
  imagic edit dog.png "a photo of a sitting dog" \\
      --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --eta 0.6:0.8:0.1 --seeds 0,1 --out dog-sitting
  (then re-render other η and seeds instantly: imagic generate dog-sitting/session --eta 0.9)"""
GENERATE_EXAMPLE = """example:
  imagic generate dog-sitting/session --eta 0.5,0.9 --seeds 3,4 --out dog-more"""
INFO_EXAMPLE = """example:
  imagic info stable-diffusion-v1-5/stable-diffusion-v1-5"""


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    edit = sub.add_parser(
        "edit", help="fit an image to a text (stages 1-2) and render edits (stage 3)",
        description="Edit IMAGE to match TEXT. Writes one PNG per (η, seed), grid.png and "
                    "manifest.json to --out, and the reusable session to --session.",
        epilog=EDIT_EXAMPLE, formatter_class=raw,
    )
    edit.add_argument("image", help="the photo to edit")
    edit.add_argument("text", help='the target text, e.g. "a photo of a sitting dog"')
    model_options(edit)
    recipe_options(edit)
    stage3_options(edit, "output folder (default: imagic-out)")
    edit.add_argument("--session", help="where to save the session (default: OUT/session)")
    edit.add_argument("--no-session", action="store_true", help="do not save the session")
    edit.add_argument("--pad", action="store_true",
                      help="letterbox a non-square image instead of centre-cropping it")
    edit.set_defaults(func=cmd_edit)

    gen = sub.add_parser(
        "generate", help="render new η and seeds from a saved session, without training",
        description="Render SESSION (made by `imagic edit`) at new η and seeds.",
        epilog=GENERATE_EXAMPLE, formatter_class=raw,
    )
    gen.add_argument("session", help="a session folder written by `imagic edit`")
    model_options(gen)
    stage3_options(gen, "output folder (default: SESSION-render-N beside the session, "
                        "the first N not taken)")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser(
        "info", help="describe a model: resolution, prediction type, parameter counts",
        epilog=INFO_EXAMPLE, formatter_class=raw,
    )
    info.add_argument("model", nargs="?", default=None,
                      help="hub id, diffusers folder or .safetensors file")
    model_options(info, with_model=False)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)


def cmd_edit(args) -> int:
    from ..auto_eta import choose_etas
    from ..editor import Imagic, clean_text
    from ..errors import InputError
    from ..images import file_sha256, load_image
    from ..outputs import (
        check_out_dir,
        check_session_dir,
        lock_output,
        time_and_memory,
        write_outputs,
    )
    from ..presets import DEFAULT_PRESET, get_preset

    # 1. Check every input before loading anything heavy
    image = load_image(args.image, min_side=1)  # the model's own minimum: in fit
    text = clean_text(args.text)
    out = check_out_dir(args.out or "imagic-out")
    if args.no_session and args.session:
        raise InputError("--session and --no-session contradict each other; give one")
    session_dir = None if args.no_session else check_session_dir(
        Path(args.session or out / "session"), out)
    options = {**options_given(args, RECIPE, SAMPLING), "etas": args.etas, "seeds": args.seeds,
               "low_memory": args.low_memory}
    get_preset(args.preset or DEFAULT_PRESET).with_options(**options)  # fails before loading
    with ExitStack() as locks:  # no other run writes these folders until this one ends
        locks.enter_context(lock_output(out))
        if session_dir is not None and not session_dir.resolve().is_relative_to(out.resolve()):
            locks.enter_context(lock_output(session_dir, "--session"))
        # 2. Load the model (its own preset unless --preset), fit (stages 1-2)
        backend = load_model(args, args.model)
        config = get_preset(args.preset or backend.default_preset).with_options(**options)
        editor = Imagic(backend, config, quiet=args.quiet)
        session = editor.fit(image, text, image_sha256=file_sha256(args.image),
                             pad=args.pad)
        # 3. Save the session into its place first (the costly part, kept even if a later step
        #    fails), then stage 3, auto-η's scoring, and the images, grid and manifest into
        #    --out: all of them or none
        if session_dir is not None:
            session.save(session_dir)
        results = editor.generate(session)
        choices = choose_etas(backend, session, results) if args.etas == "auto" else None
        try:
            write_outputs(out, session, results, config.etas, config.seeds,
                          {"command": "edit", "image": str(Path(args.image).resolve()),
                           "session": str(session_dir) if session_dir else None}, choices)
        except OSError as err:
            if session_dir is None:
                raise
            kept = (f"the session is saved in {session_dir}; `imagic generate {session_dir}` "
                    "renders it")
            raise OSError(err.errno, f"{err.strerror or err} ({kept})", err.filename) from None
    say(args, out, results, session_dir, choices)
    if not args.quiet:
        print(time_and_memory(session.timings))
    return 0


def cmd_generate(args) -> int:
    from ..auto_eta import choose_etas
    from ..editor import Imagic
    from ..outputs import check_render_dir, lock_output, next_render_dir, write_outputs
    from ..session import EditSession

    session = EditSession.load(args.session)
    out = check_render_dir(args.out or next_render_dir(args.session), args.session)
    stage3 = {k: v for k, v in options_given(args, SAMPLING).items() if v is not None}
    # η, seeds and sampling checked against the session's recipe before the model loads
    config = session.config.with_options(etas=args.etas, seeds=args.seeds, **stage3)
    with lock_output(out):  # no other run writes this folder until this one ends
        if args.model:
            backend = load_model(args, args.model)
        else:  # the session's own model, as it was loaded: revision and single-file configs
            saved = session.model
            backend = load_model(args, saved.get("source"), saved.get("config"),
                                 saved.get("revision"))
        session.check_model(backend)
        editor = Imagic(backend, session.config, quiet=args.quiet)
        results = editor.generate(session, config.etas, config.seeds, **stage3)
        choices = choose_etas(backend, session, results) if args.etas == "auto" else None
        write_outputs(out, session, results, config.etas, config.seeds,
                      {"command": "generate", "session": str(Path(args.session).resolve())},
                      choices, stage3,
                      {k: v for k, v in session.timings.items() if k.startswith("generate_")})
    say(args, out, results, None, choices)
    return 0


def cmd_info(args) -> int:
    backend = load_model(args, args.model)
    info = backend.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "stage2_gpu_gb":  # an estimate: say what it counts
            value = (f"full {value['full']:g}, lora {value['lora']:g} (weights, gradients and "
                     "Adam states a GPU must hold, before activations)")
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                              for k, v in value.items())
        print(f"{key:16} {value}")
    return 0


def say(args, out: Path, results, session_dir, choices=None) -> None:
    if args.quiet:
        return
    print(f"wrote {len(results)} image(s), grid.png and manifest.json to {out}")
    for seed, choice in (choices or {}).items():
        forgetting = f", forgetting {choice.forget}" if choice.others else ""
        print(f"auto-η: seed {seed} → η {choice.eta:g}{forgetting} "
              f"({out / f'auto_seed{seed}.png'})")
    if session_dir is not None:
        print(f"session saved to {session_dir}; re-render with "
              f"`imagic generate {session_dir} --eta ...`")
