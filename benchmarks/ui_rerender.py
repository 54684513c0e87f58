"""Seconds for one re-render of one η from a session in memory (what moving the page's η slider
costs) against a full edit (stages 1-3), through the same `Studio` calls the page makes, on the
embedded model and the CPU.

    .venv/bin/python benchmarks/ui_rerender.py [--threads 2] [--repeats 3] [--preset shapes]

Sessions are written to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from imagic import load_backend
from imagic.ui import Studio

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "large-red-circle-top-left.png"
TEXT = "a large blue circle at the top left"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="re-renders timed (default 3)")
    parser.add_argument("--preset", default="shapes", help="the edit's recipe (default shapes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_backend(None, device="cpu")
    with tempfile.TemporaryDirectory() as sessions:
        studio = Studio(backend, sessions, args.preset)
        request = studio.check_edit(EXAMPLE, TEXT, None, {})
        start = time.perf_counter()
        render = studio.edit(request)
        edit_s = time.perf_counter() - start
        config = request.config
        times = []
        for i in range(args.repeats):  # a new η each time: every one is sampled
            start = time.perf_counter()
            studio.render(render.name, 0.55 + 0.05 * i, config.seeds[:1])
            times.append(time.perf_counter() - start)
    rerender_s = statistics.median(times)
    print(f"imagic ui re-render benchmark: embedded model, {args.threads} CPU thread(s), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible")
    print(f"recipe {args.preset}: stage 1 {config.embed_steps} steps, stage 2 "
          f"{config.finetune_steps} steps, {len(config.etas)} η × {len(config.seeds)} seed(s), "
          f"{config.sample_steps} {config.sampler} steps from {config.start}")
    print()
    print("| what | seconds |")
    print("| --- | ---: |")
    print(f"| full edit (stages 1-3, {len(config.etas)} η, written) | {edit_s:.1f} |")
    print(f"| re-render of one η (stage 3, written; median of {args.repeats}) | "
          f"{rerender_s:.2f} |")
    print(f"| ratio | {edit_s / rerender_s:.0f}× |")


if __name__ == "__main__":
    main()
