"""`imagic batch`: many edits from a JSONL file or a TEdBench folder (imagic.batch), resumable,
over the processes `accelerate launch` starts (or one)."""

from __future__ import annotations

import argparse
import sys

from .options import (
    RECIPE,
    SAMPLING,
    add_options,
    load_model,
    model_options,
    options_given,
    recipe_options,
)

BATCH_EXAMPLE = """examples:
  imagic batch jobs.jsonl --out edits --model stable-diffusion-v1-5/stable-diffusion-v1-5
      jobs.jsonl: one edit per line, e.g.
      {"image": "dog.png", "text": "a photo of a sitting dog", "eta": [0.7, 0.8], "id": "dog"}
  accelerate launch --num_processes 4 -m imagic batch jobs.jsonl --out edits --preset fast
      (4 GPUs: each process loads the model once and claims jobs as it goes)
  imagic batch tedbench/ --out tedbench-edits     (a TEdBench folder: input_list.json, originals/)
Re-running the same command skips the jobs that are done."""


def register(sub) -> None:
    p = sub.add_parser(
        "batch", help="many edits from a JSONL file or a TEdBench folder, resumable",
        description="Run every job of JOBS (a JSONL file of {image, text, and optionally id, "
                    "eta, seeds, preset}, or a TEdBench folder) into OUT/ID/, as `imagic edit "
                    "--out OUT/ID` writes it. Every job is checked first; a done job (its "
                    "manifest.json in place) is skipped; a failing one is recorded in "
                    "OUT/failures.jsonl and the run goes on. Under `accelerate launch`, every "
                    "process claims jobs from the same OUT.",
        epilog=BATCH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("jobs", help="a JSONL file of jobs, or a TEdBench folder")
    p.add_argument("--out", required=True, help="the folder of the jobs' outputs")
    model_options(p)
    recipe_options(p)
    add_options(p, SAMPLING)
    p.add_argument("--skip-bad", action="store_true",
                   help="run the good jobs when some are bad (default: refuse to start)")
    p.add_argument("--no-session", action="store_true", help="do not keep each job's session")
    p.add_argument("--verbose", action="store_true",
                   help="every job's stage bars, and a job bar per process")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from ..batch import process_slot, read_jobs, run_edit, run_jobs
    from ..errors import InputError
    from ..outputs import check_out_dir
    from ..presets import DEFAULT_PRESET, get_preset

    # 1. Every job and option checked before the model loads
    jobs, problems = read_jobs(args.jobs)
    if problems and not args.skip_bad:
        raise InputError(f"{len(problems)} bad job(s) in {args.jobs}: {'; '.join(problems)} "
                         "(fix them, or --skip-bad to run the other jobs)")
    for problem in problems:
        print(f"imagic batch: skipped {problem}", file=sys.stderr)
    out = check_out_dir(args.out)
    options = {**options_given(args, RECIPE, SAMPLING), "low_memory": args.low_memory}
    get_preset(args.preset or DEFAULT_PRESET).with_options(**options)
    # 2. One model per process, on the process's own GPU when accelerate launched several
    rank, args.device = process_slot(args.device)
    backend = load_model(args, args.model)

    def config_for(job):
        preset = get_preset(job.preset or args.preset or backend.default_preset)
        return preset.with_options(**{**options, **job.options})

    def done(job) -> bool:  # its manifest is written last
        return (out / job.id / "manifest.json").is_file()

    # 3. Claim and run
    tally = run_jobs(
        jobs, out,
        work=lambda job: run_edit(backend, job, out / job.id, config_for(job),
                                  not args.no_session, args.verbose),
        done=done, rank=rank, progress=args.verbose or rank == 0)
    per_job = sum(tally.seconds) / len(tally.seconds) if tally.seconds else 0.0
    print(f"process {rank}: {tally.done} done, {tally.skipped} skipped, "
          f"{tally.failed} failed" + (f", {per_job:.1f} s per job" if tally.seconds else ""))
    if rank == 0:
        finished = sum(map(done, jobs))
        print(f"{finished} of {len(jobs)} jobs done in {out}"
              + (f"; failures: {out / 'failures.jsonl'}" if finished < len(jobs) else ""))
    return 0 if tally.failed == 0 else 1
