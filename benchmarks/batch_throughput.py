"""Jobs per hour of `imagic batch` on one machine's CPU cores: one process using every core
against `accelerate launch` with one process per core, on the embedded model and its preset.

    .venv/bin/python benchmarks/batch_throughput.py --jobs 8 [--processes 2] [--out DIR]

The jobs are edits of the shipped examples (each example's text, one η per job, so no two jobs
are the same edit); sessions are not kept. Each arrangement runs in a fresh folder, timed from
the command's start to its end (model loading included, as a user waits for it). The
machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"large-red-circle-top-left": "a large blue circle at the top left",
            "small-yellow-square-center": "a small yellow circle at the center",
            "large-green-triangle-bottom-right": "a large green square at the bottom right"}


def write_jobs(path: Path, count: int) -> None:
    names = list(EXAMPLES)
    lines = [json.dumps({"id": f"job{i}", "image": str(ROOT / "examples" / f"{names[i % 3]}.png"),
                         "text": EXAMPLES[names[i % 3]], "eta": 0.9 + 0.1 * (i // 3)})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n")


def timed(command: list[str], threads: int) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs per arrangement (default 8)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2,
                        help="processes of the accelerate run (default: the CPU count)")
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        root.mkdir(parents=True, exist_ok=True)
        jobs = root / "jobs.jsonl"
        write_jobs(jobs, args.jobs)
        batch = ["-m", "imagic", "batch", str(jobs), "--no-session", "--device", "cpu"]
        one = timed([sys.executable, *batch, "--out", str(root / "one")], threads=cores)
        launcher = str(Path(sys.executable).parent / "accelerate")
        many = timed([launcher, "launch", "--multi_gpu", "--num_processes",
                      str(args.processes), "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", *batch, "--out", str(root / "many")],
                     threads=max(1, cores // args.processes))
    print(f"imagic batch throughput: {args.jobs} edits, embedded model, its preset; "
          f"{platform.machine()}, {cores} cores, {time.strftime('%a %b %d %H:%M UTC %Y')}")
    print("| arrangement | seconds | jobs per hour |")
    print("| --- | ---: | ---: |")
    print(f"| 1 process, {cores} threads | {one:.1f} | {3600 * args.jobs / one:.0f} |")
    print(f"| {args.processes} processes (accelerate launch), "
          f"{max(1, cores // args.processes)} thread(s) each | {many:.1f} | "
          f"{3600 * args.jobs / many:.0f} |")


if __name__ == "__main__":
    main()
