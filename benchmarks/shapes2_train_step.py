"""Speed of one ShapesWorld 2 cascade training step, eager against `torch.compile`, in one run.

    .venv/bin/python benchmarks/shapes2_train_step.py --init-from src/imagic/assets/shapes2-128 \
        --steps 30 --out /tmp/train-step.json

Each mode builds its own trainer as `imagic train-shapes --world 2` does (the device's default
batch: 32 on the CPU, 256 on CUDA), warm-started from the same model when --init-from is given,
and runs the same batches, rendered before the clock starts so that only the step is timed:
forward and backward through both stages and the text encoder, gradient clipping, AdamW and the
EMA. `compile` wraps both UNets in `torch.compile` (inductor); its first steps, which compile,
are timed apart from the steady ones. Writes the table to stdout and, with --out, the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from imagic.bench import run_script, write_report  # noqa: E402
from imagic.errors import InputError  # noqa: E402
from imagic.shapes.train import TrainConfig  # noqa: E402
from imagic.shapes2.model import SR_STAGE, CascadeConfig  # noqa: E402
from imagic.shapes2.train import CascadeTrainer  # noqa: E402

MODES = ("eager", "compile")


def measure(mode: str, config: TrainConfig, steps: int, warmup: int) -> dict:
    """Seconds of the first `warmup` steps, then seconds per step and samples per second over
    the next `steps`."""
    trainer = CascadeTrainer(config)
    if mode == "compile":
        for name in ("unet", SR_STAGE):
            trainer.models[name] = torch.compile(trainer.models[name])
    timesteps = trainer.scheduler.config.num_train_timesteps
    batches = [trainer.make_batch(config.seed, s, trainer.batch_size, config.caption_dropout,
                                  timesteps) for s in range(warmup + steps)]
    start = time.perf_counter()
    for batch in batches[:warmup]:
        trainer.train_step(batch)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer.train_step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)  # the clock stops when the GPU's work is done
    seconds = time.perf_counter() - start
    return {"mode": mode, "batch": trainer.batch_size, "first_steps_s": round(first, 1),
            "s_per_step": round(seconds / steps, 3),
            "samples_per_s": round(steps * trainer.batch_size / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", help="a ShapesWorld 2 model folder to start from "
                                            "(default: new weights)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps run before the clock starts (default 5)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise InputError("--steps and --warmup must be 1 or more")
    # the trainer writes nothing until its run, which this does not call
    config = TrainConfig(out="unused", device=args.device, seed=0, init_from=args.init_from,
                         model=CascadeConfig())
    print("| mode | batch | first steps, s | s per step | samples/s |\n| --- | ---: | ---: | ---: "
          "| ---: |", flush=True)
    rows = []
    for mode in args.modes:
        row = measure(mode, config, args.steps, args.warmup)
        rows.append(row)
        print(f"| {mode} | {row['batch']} | {row['first_steps_s']} | {row['s_per_step']} | "
              f"{row['samples_per_s']} |", flush=True)
    write_report(args.out, "benchmarks/shapes2_train_step.py", sys.argv[1:], args.device,
                 rows=rows)
    return 0


if __name__ == "__main__":
    run_script(main)
