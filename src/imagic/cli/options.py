"""The options several commands share, each declared once: argument types, the model options,
the recipe (stages 1–2) and stage 3's. Values are parsed here and checked below the CLI, by
`EditConfig.with_options` and the functions the commands call."""

from __future__ import annotations

import argparse
import math

from ..forgetting import CHOICES as FORGET_CHOICES
from ..presets import CUDA_GRAPHS, INTERPOLATIONS, MAX_VALUES, SAMPLERS, STARTS, TUNINGS

# ------------------------------------------------------------------------ argument types


def parse_etas(text: str) -> tuple[float, ...]:
    """'0.6,0.7,0.8' or 'start:stop:step' (stop included)."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start:
                raise ValueError
            span = (stop - start) / step
            _bounded(span + 1 if math.isfinite(span) else math.inf, text)  # before expanding
            count = int(round(span + 1e-9)) + 1
            etas = tuple(round(start + i * step, 6) for i in range(count))
        else:
            etas = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"η must be numbers like 0.6,0.7 or a range like 0.5:1.0:0.1, got {text!r}"
        ) from None
    if not etas:
        raise argparse.ArgumentTypeError("give at least one η")
    return etas


def _bounded(count: float, text: str) -> None:
    """A range gives at most MAX_VALUES values: checked before it is expanded."""
    if count > MAX_VALUES:
        raise argparse.ArgumentTypeError(f"{text!r} gives {count:.0f} values; at most "
                                         f"{MAX_VALUES}")


def parse_eta_or_auto(text: str) -> tuple[float, ...] | str:
    """parse_etas, or 'auto': sweep imagic.auto_eta.AUTO_ETAS and pick one η per seed."""
    return "auto" if text.strip().lower() == "auto" else parse_etas(text)


def parse_floats(text: str) -> tuple[float, ...]:
    """'1,1.5,2': one number or several."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,1.5,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return tuple(dict.fromkeys(values))


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' or 'first:last' (both included); integers only, each once."""
    try:
        if ":" in text:
            first, last = (int(x) for x in text.split(":"))
            _bounded(last - first + 1, text)  # before expanding it
            seeds = tuple(range(first, last + 1))
        else:
            seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers like 0,1,2 or a range like 0:3, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return tuple(dict.fromkeys(seeds))


# ------------------------------------------------------------------------ shared options


def model_options(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    """Which model to load, and where it runs."""
    if with_model:
        p.add_argument("--model", help="hub id, diffusers folder, or .safetensors file; "
                                       "imagic:shapes2-128 for the shipped ShapesWorld 2 "
                                       "cascade (default: the embedded imagic:shapes-32)")
    p.add_argument("--config", help="diffusers folder with the configs of a single-file model "
                                    "(needed offline)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled checkpoints (.ckpt/.bin/.pt); they can run code")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="precision of frozen parts and autocast on CUDA "
                        "(auto: bf16 on CUDA; the CPU runs float32 only)")


def load_model(args, model, config=None, revision=None):
    """The backend named by `model` (None: the embedded one) with the model options given."""
    from ..backends import load_backend

    return load_backend(model, device=args.device, dtype=args.dtype,
                        allow_pickle=args.allow_pickle, config=args.config or config,
                        revision=args.revision or revision)


# (flag, EditConfig field, argparse keywords): stages 1-2, for edit and the benchmarks
RECIPE = (
    ("--tuning", "tuning",
     dict(choices=TUNINGS, help="stages 1-2: imagic (the paper: the embedding, then the "
                                "model) or forgedit (both at once, the UNet's inner blocks "
                                "only; the quick preset's)")),
    ("--finetune", "finetune", dict(choices=["full", "lora"],
                                    help="stage 2: all UNet weights or a LoRA adapter")),
    ("--lora-rank", "lora_rank", dict(type=int, help="LoRA rank (with --finetune lora)")),
    ("--embed-steps", "embed_steps", dict(type=int, help="stage 1 steps")),
    ("--embed-lr", "embed_lr", dict(type=float, help="stage 1 learning rate")),
    ("--finetune-steps", "finetune_steps", dict(type=int, help="stage 2 steps")),
    ("--finetune-lr", "finetune_lr", dict(type=float, help="stage 2 learning rate (full)")),
    ("--lora-lr", "lora_lr", dict(type=float, help="stage 2 learning rate (LoRA)")),
    ("--aux-finetune-steps", "aux_finetune_steps",
     dict(type=int, help="stage 2 steps of each super-resolution stage (cascades)")),
    ("--aux-finetune-lr", "aux_finetune_lr",
     dict(type=float, help="stage 2 learning rate of each super-resolution stage (full)")),
    ("--aux-finetune-crop", "aux_finetune_crop",
     dict(type=int, help="side of the random crops each super-resolution stage fine-tunes on "
                         "(0: the whole image)")),
    ("--timesteps-per-step", "timesteps_per_step",
     dict(type=int, help="K: (t, ε) draws per optimizer step, both stages")),
    ("--finetune-timesteps-per-step", "finetune_timesteps_per_step",
     dict(type=int, help="K for stage 2 only (after --timesteps-per-step)")),
    ("--aux-finetune-max-level", "aux_finetune_max_level",
     dict(type=int, help="highest augmentation level of the super-resolution stages' stage 2 "
                         "(cascades; default: their training's)")),
    ("--aux-timesteps-per-step", "aux_timesteps_per_step",
     dict(type=int, help="K for the super-resolution stages' stage 2 (cascades; default: stage "
                         "2's)")),
    ("--seed", "seed", dict(type=int, help="seed of the training draws (stages 1-2)")),
    ("--cuda-graphs", "cuda_graphs",
     dict(choices=list(CUDA_GRAPHS),
          help="stages 1-2 on a GPU: record each training step once as a CUDA graph and "
               "replay it (faster, more reserved memory; docs/PERFORMANCE.md). auto: where "
               "at least 40 GiB can be used; default: the preset's")),
)
# stage 3's sampling: for edit, generate and the benchmarks
SAMPLING = (
    ("--guidance", "guidance", dict(type=float, help="classifier-free guidance scale")),
    ("--sample-steps", "sample_steps",
     dict(type=int, help="sampling steps (default: the preset's or the session's)")),
    ("--sampler", "sampler",
     dict(choices=SAMPLERS, help="stage 3's solver: ddim (the paper's) or dpm++ "
                                 "(DPM-Solver++ 2M: use ~20 steps); default: the preset's "
                                 "or the session's")),
    ("--start", "start",
     dict(choices=STARTS, help="where sampling starts: noise (the paper: fresh noise per seed) "
                               "or inversion (the input's own noise, found by running DDIM "
                               "backwards: keeps its details; one image per η); default: the "
                               "preset's or the session's")),
    ("--interpolation", "interpolation",
     dict(choices=INTERPOLATIONS, help="how η mixes e_tgt and e_opt: linear (the paper's), "
                                       "vp (Forgedit's vector projection: e_opt + η × the part "
                                       "of e_tgt orthogonal to it) or attention (AID: each "
                                       "image attends to the e_opt and e_tgt images' attention, "
                                       "sampled beside it); default: the session's")),
    ("--attention-warmup", "attention_warmup",
     dict(type=float, help="with --interpolation attention: the fraction of the sampling "
                           "steps that interpolate attention (default 0.5, AID's)")),
    ("--forget", "forget",
     dict(choices=FORGET_CHOICES, help="Forgedit's forgetting: sample with these groups of "
                                       "the fine-tuned UNet back at the base weights (encoder "
                                       "= down blocks, decoder = up blocks; kv and attn keep "
                                       "those layers tuned); no retraining. auto: render with "
                                       "none, encoderkv, noencoder and decoderattn, and with "
                                       "--eta auto pick the strategy with η")),
    ("--forget-strength", "forget_strength",
     dict(type=float, help="how far the forgotten groups go back, 0 to 1 (default 1: all the "
                           "way)")),
)


def add_options(p: argparse.ArgumentParser, table, leave_out: tuple[str, ...] = ()) -> None:
    """Declare the options of RECIPE or SAMPLING on `p`, but those named in `leave_out`."""
    for flag, field, kwargs in table:
        if field not in leave_out:
            p.add_argument(flag, dest=field, **kwargs)


def recipe_options(p: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """The preset and the recipe's numbers, with --low-memory."""
    from ..presets import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", default=None,
                   help=f"recipe: {', '.join(sorted(PRESETS))} (default: the model's own, "
                        f"{DEFAULT_PRESET} for Stable Diffusion, shapes for the embedded one)")
    p.add_argument("--low-memory", action="store_true",
                   help="stage 2 trains a LoRA adapter instead of every weight, and both "
                        "stages use gradient checkpointing: far less GPU memory, not the "
                        "paper's recipe")
    add_options(p, RECIPE, leave_out)


def options_given(args, *tables) -> dict:
    """The EditConfig fields that `args` sets through the options of `tables` (None: not
    given), for `EditConfig.with_options`."""
    return {field: getattr(args, field, None) for table in tables for _, field, _ in table}


def stage3_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """η, seeds and sampling of stage 3, the output folder and --quiet (edit and generate)."""
    p.add_argument("--eta", dest="etas", metavar="ETA", type=parse_eta_or_auto,
                   help="η values: 0.6,0.7 or 0.5:1.0:0.1, or auto (sweep 0.4:1.2:0.1 and "
                        "pick one per seed, written as auto_seedS.png)")
    p.add_argument("--seeds", type=parse_seeds, help="sampling seeds: 0,1,2 or 0:3")
    add_options(p, SAMPLING)
    p.add_argument("--out", help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
