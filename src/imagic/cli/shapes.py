"""`imagic train-shapes` and `imagic eval-shapes`: the embedded ShapesWorld model."""

from __future__ import annotations

import argparse
import sys

TRAIN_EXAMPLE = """examples:
  imagic train-shapes --out shapes-run --device cuda --max-minutes 8 --seed 5
                                                 (the run that made the embedded model)
  imagic train-shapes --out shapes-run --resume --steps 30000   (continue a stopped run)
  imagic train-shapes --world 2 --out shapes2-run --device cuda --max-minutes 9
                                                 (the ShapesWorld 2 cascade, 32 px + 128 px)
  then: imagic eval-shapes --model shapes-run/model"""
EVAL_EXAMPLE = """example:
  imagic eval-shapes --model shapes-run/model --samples 500 --json eval.json
  (without --model: the embedded model)"""


def register(sub) -> None:
    from ..shapes.evaluate import DEFAULT_GUIDANCE
    from ..shapes.train import TrainConfig
    from ..shapes2.model import CascadeConfig

    raw = argparse.RawDescriptionHelpFormatter
    train_p = sub.add_parser(
        "train-shapes", help="train the ShapesWorld text-to-image model from scratch",
        description="Train a ShapesWorld model on images rendered on the fly: world 1, the "
                    "32×32 model; world 2, the cascade of a 32×32 base and a 32→128 "
                    "super-resolution stage. Writes train_log.jsonl, samples/, a resumable "
                    "checkpoint/ and the exported model/ to --out.",
        epilog=TRAIN_EXAMPLE, formatter_class=raw,
    )
    defaults = TrainConfig()
    train_p.add_argument("--out", required=True, help="output folder")
    train_p.add_argument("--world", type=int, choices=(1, 2), default=1,
                         help="1: ShapesWorld, 32×32 (default); 2: ShapesWorld 2, the cascade")
    train_p.add_argument("--steps", type=int, default=defaults.steps,
                         help=f"total optimizer steps (default {defaults.steps})")
    train_p.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 32 on the CPU")
    train_p.add_argument("--lr", type=float,
                         help="AdamW learning rate (default: 1e-3 × √(batch size / 256))")
    train_p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    train_p.add_argument("--workers", type=int,
                         help="data processes (default: 0 on the CPU, min(12, cores-2) on CUDA)")
    train_p.add_argument("--max-minutes", type=float,
                         help="wall-clock budget: then checkpoint, sample and export")
    train_p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                         help=f"steps between checkpoints (default {defaults.checkpoint_every})")
    train_p.add_argument("--sample-every", type=int, default=defaults.sample_every,
                         help="steps between sample grids (0: only at the end)")
    train_p.add_argument("--snr-gamma", type=float, default=defaults.snr_gamma,
                         help=f"Min-SNR-γ loss weighting (default {defaults.snr_gamma:g}; "
                              "0: none, plain MSE)")
    train_p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train_p.add_argument("--init-from", help="start from the weights of an exported model folder")
    train_p.add_argument("--freeze", default="", metavar="NAMES",
                         help="comma-separated models held at their --init-from weights while "
                              "the others train (world 2: unet, sr128, text_encoder)")
    train_p.add_argument("--fresh", default="", metavar="NAMES",
                         help="comma-separated models that start from their seed rather than "
                              "--init-from's weights, e.g. unet with --base-channels")
    train_p.add_argument("--base-channels", type=_widths, metavar="W1,W2,W3",
                         help="world 2: the base UNet's widths at 32², 16², 8² (default "
                              f"{','.join(map(str, CascadeConfig().base_channels))})")
    train_p.add_argument("--seed", type=int, default=defaults.seed,
                         help="seeds the initial weights and every data and noise draw")
    train_p.add_argument("--quiet", action="store_true", help="no progress bar")
    train_p.set_defaults(func=cmd_train_shapes)

    eval_p = sub.add_parser(
        "eval-shapes", help="score a ShapesWorld model's text-to-image accuracy",
        description="Generate one image per random caption and read it back with the "
                    "detectors: per-attribute accuracy and the fraction with every named "
                    "attribute (and, in ShapesWorld 2, the object count) right.",
        epilog=EVAL_EXAMPLE, formatter_class=raw,
    )
    eval_p.add_argument("--model", help="model folder (default: the embedded model)")
    eval_p.add_argument("--samples", type=int, default=500, help="captions (default 500)")
    eval_p.add_argument("--seed", type=int, default=0, help="seeds the captions and the noise")
    eval_p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance (default {DEFAULT_GUIDANCE:g})")
    eval_p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    eval_p.add_argument("--batch", type=int, default=100, help="images per sampling call")
    eval_p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    eval_p.add_argument("--json", help="also write the result (with per-sample rows) here")
    eval_p.add_argument("--quiet", action="store_true", help="no progress bar")
    eval_p.set_defaults(func=cmd_eval_shapes)


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give whole numbers separated by commas, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def cmd_train_shapes(args) -> int:
    from ..errors import InputError
    from ..shapes import train as training
    from ..shapes2.model import CascadeConfig

    if args.world == 2:
        model = (CascadeConfig(base_channels=args.base_channels) if args.base_channels
                 else CascadeConfig())
    elif args.base_channels:
        raise InputError("--base-channels sets the ShapesWorld 2 base: give --world 2")
    else:
        model = training.ModelConfig()
    config = training.TrainConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        device=args.device, workers=args.workers, max_minutes=args.max_minutes,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
        resume=args.resume, seed=args.seed, quiet=args.quiet, init_from=args.init_from,
        freeze=_names(args.freeze), fresh=_names(args.fresh),
        snr_gamma=args.snr_gamma or None, command=" ".join(["imagic", *sys.argv[1:]]),
        model=model,
    )
    training.train(config)
    return 0


def cmd_eval_shapes(args) -> int:
    from ..backends import load_backend, require_family
    from ..errors import InputError
    from ..shapes.evaluate import (
        check_evaluation,
        markdown_table,
        text_to_image_accuracy,
        write_report,
    )
    from ..shapes2 import evaluate as world2

    check_evaluation(args.samples, args.steps, args.batch, args.json, args.seed, args.guidance)
    backend = load_backend(args.model, device=args.device)
    require_family(backend, "pixel-cascade", "eval-shapes (the ShapesWorld detectors)")
    # the world is the one whose images the model makes: 32 px ShapesWorld, 128 px ShapesWorld 2
    worlds = {32: (text_to_image_accuracy, markdown_table),
              128: (world2.text_to_image_accuracy, world2.markdown_table)}
    if backend.output_resolution not in worlds:
        raise InputError(f"eval-shapes scores ShapesWorld models (32 or 128 px images); this "
                         f"one makes {backend.output_resolution} px images")
    accuracy, table = worlds[backend.output_resolution]
    result = accuracy(backend, samples=args.samples, seed=args.seed, guidance=args.guidance,
                      steps=args.steps, batch=args.batch, rows=bool(args.json),
                      progress=not args.quiet)
    print(table(result))
    if args.json:
        write_report(result, args.json)
    return 0
