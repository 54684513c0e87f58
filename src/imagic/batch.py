"""Many edits, resumable, over one or many processes: `imagic batch JOBS --out DIR`.

JOBS is a JSONL file, one edit per line ({"image", "text"}, optionally "id", "eta", "seeds",
"preset"), or a TEdBench-style folder (input_list.json and originals/). Every job is checked
before any runs (`read_jobs`); each writes DIR/ID/ as `imagic edit --out DIR/ID` does, and is
done once DIR/ID/manifest.json is in place (written last, `outputs.write_outputs`).

Processes claim jobs as they go, not by a static split (edits differ in length): a job is
claimed by holding an exclusive lock on DIR/.claims/ID.lock while it runs. The operating system
drops the lock of a process that dies, so another process, or the next run of the same command,
takes the job again; a done job is never redone. Under `accelerate launch` every process loads
the model on its own device (accelerate's PartialState) and claims from the same folder; without
it one process runs them all. A job that fails is appended to DIR/failures.jsonl with its error
line and the run goes on; the next run tries it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ImagicError, InputError
from .images import file_sha256, load_image

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a job id is a folder name
CLAIMS = ".claims"
FAILURES = "failures.jsonl"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")  # TEdBench names leave them out


@dataclass
class Job:
    id: str
    image: Path
    text: str
    line: int  # where it was read: the JSONL line (1-based) or the input_list.json entry
    options: dict = field(default_factory=dict)  # EditConfig overrides: etas, seeds
    preset: str | None = None


def read_jobs(source: str | os.PathLike) -> tuple[list[Job], list[str]]:
    """The jobs of a JSONL file or a TEdBench folder, and one line per bad job ("line N:
    why"): malformed JSON, a missing or unusable image, an empty text, a bad id, η, seeds or
    preset, an id given twice. Nothing is run; the caller decides whether to refuse."""
    source = Path(source)
    if source.is_dir():
        entries = _tedbench_entries(source)
    elif source.is_file():
        entries = _jsonl_entries(source)
    else:
        raise InputError(f"{source}: no such jobs file or folder")
    jobs, problems, seen = [], [], set()
    for line, entry, base in entries:
        try:
            job = _job(line, entry, base)
            if job.id in seen:
                raise InputError(f"the id {job.id!r} is given twice")
            seen.add(job.id)
            jobs.append(job)
        except InputError as err:
            problems.append(f"line {line}: {err}")
    if not jobs and not problems:
        raise InputError(f"{source} holds no jobs")
    return jobs, problems


def _jsonl_entries(path: Path) -> Iterator[tuple[int, object, Path]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text), path.parent
        except json.JSONDecodeError as err:
            yield number, InputError(f"not valid JSON ({err.msg})"), path.parent


def _tedbench_entries(folder: Path) -> Iterator[tuple[int, object, Path]]:
    listing = folder / "input_list.json"
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: no readable input_list.json ({err})") from None
    if not isinstance(entries, list):
        raise InputError(f"{listing} must be a list of {{img_name, target_text}}")
    for index, entry in enumerate(entries, 1):
        if isinstance(entry, dict) and isinstance(entry.get("img_name"), str):
            name = entry["img_name"]
            found = find_original(folder, name)
            # the id is `imagic bench tedbench`'s name for the pair (its index from 0)
            entry = {"id": f"{index - 1:03d}-{Path(name).stem}", "text": entry.get("target_text"),
                     "image": str(found or folder / "originals" / name)}
        yield index, entry, folder


def find_original(folder: Path, name: str) -> Path | None:
    """A TEdBench folder's image `name` under originals/, as named or with an extension."""
    candidates = [folder / "originals" / (name + e) for e in ("", *EXTENSIONS)]
    return next((p for p in candidates if p.is_file()), None)


def _job(line: int, entry: object, base: Path) -> Job:
    from .editor import clean_text
    from .presets import PRESETS, get_preset

    if isinstance(entry, InputError):
        raise entry
    if not isinstance(entry, dict):
        raise InputError("a job is a JSON object with \"image\" and \"text\"")
    unknown = sorted(set(entry) - {"id", "image", "text", "eta", "seeds", "preset"})
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}")
    if not isinstance(entry.get("image"), str) or not isinstance(entry.get("text"), str):
        raise InputError("\"image\" and \"text\" must be strings")
    image = (base / entry["image"]).expanduser()
    load_image(image, min_side=1)  # InputError with the command line's reason
    text = clean_text(entry["text"])
    job_id = entry.get("id", f"{line:04d}-{image.stem}")
    if not isinstance(job_id, str) or not ID_PATTERN.fullmatch(job_id):
        raise InputError(f"id {job_id!r}: letters, digits, '.', '_' and '-' only, at most 100")
    options = {}
    if "eta" in entry:
        etas = entry["eta"]
        etas = [etas] if isinstance(etas, (int, float)) else etas
        if not (etas == "auto" or isinstance(etas, list) and etas and all(
                isinstance(x, (int, float)) and math.isfinite(x) for x in etas)):
            raise InputError(f"eta must be a number, a list of numbers or \"auto\", got "
                             f"{entry['eta']!r}")
        options["etas"] = etas
    if "seeds" in entry:
        seeds = entry["seeds"]
        seeds = [seeds] if isinstance(seeds, int) else seeds
        if not (isinstance(seeds, list) and seeds and all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise InputError(f"seeds must be a whole number or a list of them, got {seeds!r}")
        options["seeds"] = seeds
    preset = entry.get("preset")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}")
    get_preset(preset or "paper").with_options(**options)  # η and seeds in range
    return Job(job_id, image, text, line, options, preset)


# --------------------------------------------------------------------------- running


@dataclass
class Tally:
    done: int = 0  # by this process
    skipped: int = 0  # done before, or by another process
    failed: int = 0
    seconds: list[float] = field(default_factory=list)


def process_slot(device: str) -> tuple[int, str]:
    """(this process's number, the device it uses): under `accelerate launch` on GPUs each
    process takes its own card; on CPUs accelerate starts the processes through torchrun,
    whose RANK numbers them, and nothing is exchanged between them (jobs are claimed through
    the output folder)."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1:
        return state.process_index, str(state.device) if device == "auto" else device
    return int(os.environ.get("RANK", 0)), device


def run_jobs(jobs, out: Path, work: Callable[[object], None], done: Callable[[object], bool],
             rank: int = 0, progress: bool = True, wait: float = 1.0) -> Tally:
    """Claim and run (`work`) every job (anything with an `id`) not `done` yet, until each is
    done or has failed in this run: a job another process holds is passed over, and taken up
    again if that process dies without finishing it. Returns what this process did."""
    from tqdm.auto import tqdm

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / CLAIMS).mkdir(exist_ok=True)
    tally = Tally()
    bar = tqdm(total=len(jobs), desc=f"jobs (process {rank})", unit="job", position=rank,
               disable=not progress)
    pending = list(jobs)
    while pending:
        held = []
        for job in pending:
            with _claim(out, job.id) as mine:
                if not mine:  # another process runs it now
                    held.append(job)
                    continue
                if done(job) or _failed_since(out, job, started):
                    tally.skipped += 1
                else:
                    begin = time.perf_counter()
                    try:
                        work(job)
                    except (ImagicError, OSError, RuntimeError, ValueError) as err:
                        tally.failed += 1
                        _record_failure(out, job, err, rank)
                    else:
                        tally.done += 1
                        tally.seconds.append(time.perf_counter() - begin)
            bar.update(1)
        if held:
            time.sleep(wait)  # until their processes finish them, or die and free them
        pending = held
    bar.close()
    return tally


@contextlib.contextmanager
def _claim(out: Path, job_id: str) -> Iterator[bool]:
    """Whether this process holds the job's lock for the block (False: another one does)."""
    fd = os.open(out / CLAIMS / f"{job_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def run_edit(backend, job: Job, folder: Path, config, session: bool, verbose: bool) -> None:
    """One job as `imagic edit --out FOLDER` runs it; done once FOLDER/manifest.json is in
    place (`write_outputs` writes it last)."""
    from .auto_eta import choose_etas
    from .editor import Imagic
    from .outputs import write_outputs

    editor = Imagic(backend, config, quiet=not verbose)
    image = load_image(job.image, min_side=1)
    fitted = editor.fit(image, job.text, image_sha256=file_sha256(job.image))
    if session:
        fitted.save(folder / "session")
    results = editor.generate(fitted)
    choices = choose_etas(backend, fitted, results) if job.options.get("etas") == "auto" \
        else None
    write_outputs(folder, fitted, results, config.etas, config.seeds,
                  {"command": "batch", "image": str(job.image.resolve()), "id": job.id,
                   "session": str(folder / "session") if session else None}, choices)


def _record_failure(out: Path, job, err: BaseException, rank: int) -> None:
    """A line in FAILURES, and a marker that keeps the other processes of this run from trying
    the job again (the next run does)."""
    line = " ".join(str(err).split()) or type(err).__name__
    record = {"id": job.id, "line": getattr(job, "line", None),
              "error": f"{type(err).__name__}: {line}",
              "process": rank, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out / FAILURES, "a", encoding="utf-8") as f:  # one write per record
        f.write(json.dumps(record) + "\n")
    (out / CLAIMS / f"{job.id}.failed").write_text(record["error"] + "\n")


def _failed_since(out: Path, job, started: float) -> bool:
    """Whether another process has failed on the job since this one started (this run); a
    failure of an earlier run is tried again."""
    marker = out / CLAIMS / f"{job.id}.failed"
    with contextlib.suppress(FileNotFoundError):
        return marker.stat().st_mtime > started
    return False
