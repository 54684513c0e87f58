"""An edit's output folder: where it may go, and what is written there.

    eta0.70_seed0.png ...   one image per (η, seed)
    auto_seedS.png          with --eta auto: the image chosen for seed S
    grid.png                the input beside every output, labelled with η and seed
    manifest.json           text, model, config, images, auto-η's signals, timings, versions

The outputs are a set: `write_outputs` writes them into a temporary folder and moves them into
place once all are written, so a run leaves the complete set or none of it. While a command
writes a folder it holds `lock_output` (a `.NAME.lock` file beside it), so a second run on the
same folder stops at once instead of mixing its files in. Files and folders get the modes the
umask gives. The session itself is `session.py`'s.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .images import follow_umask, make_grid, save_atomic, write_error, write_text_atomic
from .session import EditSession, library_versions

MANIFEST = "manifest.json"


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder that can be written, checked before anything costly runs: it is a folder or
    can be made one (no file on the way), and a file can be made in it (or in the folder it
    would be made in). Nothing is left behind: the test file is removed at once."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} is a file; choose a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {out}: {existing} is a file, so the folder cannot be made")
    check_writable(existing, f"{flag} {out}")
    if flag == "--out" and (out / "delta.safetensors").exists():
        raise InputError(f"--out {out} holds a session; choose another folder")
    return out


def check_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: the one test that a read-only mount, /proc, a full
    disk's inodes and access lists all answer truthfully (os.access says yes to root in /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".imagic-check-", dir=folder)
    except OSError as err:
        raise InputError(f"{what}: {folder} is not writable ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(name)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a folder that a command writes: `.NAME.lock` beside it."""
    target = Path(path).resolve()
    return target.parent / f".{target.name}.lock"


@contextmanager
def lock_output(path: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold the lock on writing the folder `path` for the block, taken without waiting: a
    second run on the same folder gets an InputError naming the lock (exit status 2). The lock
    file is removed at the end, and so are the folders on the way to `path` that the run made
    and left empty: a run that fails leaves nothing (a lock left by a killed run holds no
    lock, so it stops nobody)."""
    target = Path(path).resolve()
    lock = lock_path(target)
    new = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
    made_here = [p for p in new if p != target]  # the lock's folders; the run makes `target`
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _take_lock(lock, f"{flag} {path}", flag)
    except OSError as err:
        _remove_empty(made_here)
        raise InputError(f"{flag} {path}: cannot write in {lock.parent} "
                         f"({err.strerror or err})") from None
    except BaseException:
        _remove_empty(made_here)
        raise
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # before closing: a run that opens it now sees a new file
        os.close(fd)
        _remove_empty(new)


def _take_lock(lock: Path, what: str, flag: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{what} is being written by another imagic run (lock {lock}); "
                             f"wait for it or choose another {flag}") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file locked is still the one at that name (not one a finishing run removed)
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) that exists and is empty; stop at one that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def check_session_dir(path: str | os.PathLike, out: Path) -> Path:
    """Where an edit saves its session: writable, not a folder of something else, and not the
    output folder itself (both hold a manifest.json)."""
    path = Path(path)
    check_out_dir(path, "--session")
    if path.resolve() == out.resolve():
        raise InputError("--session and --out are the same folder; the session needs its own "
                         "(default: OUT/session)")
    if out.resolve().is_relative_to(path.resolve()):
        raise InputError("--out is inside --session; a session folder holds only the session "
                         "(default: OUT/session)")
    EditSession.check_destination(path)
    return path


def check_render_dir(out: str | os.PathLike, session: str | os.PathLike) -> Path:
    """Where a re-render of a saved session goes: a writable folder other than the session."""
    out = check_out_dir(out)
    if out.resolve() == Path(session).resolve():
        raise InputError("--out is the session folder; choose another (default: "
                         "SESSION-render-N beside it)")
    return out


def next_render_dir(session: str | os.PathLike) -> Path:
    """A re-render's default folder: SESSION-render-N beside the session, the first N neither
    taken nor being written, so a re-render never writes over the edit's outputs or an earlier
    re-render."""
    session = Path(session)
    n = 1
    while ((candidate := session.parent / f"{session.name}-render-{n}").exists()
           or lock_path(candidate).exists()):  # or being written by another run
        n += 1
    return candidate


def write_outputs(out: Path, session: EditSession, results, etas, seeds, extra: dict,
                  choices=None, stage3: dict | None = None,
                  timings: dict | None = None) -> None:
    """One PNG per (η, seed), grid.png and manifest.json; with auto-η `choices` also
    auto_seedS.png (the chosen image) and the signals behind each choice. `extra`: what made
    them (command, paths); `stage3`: sampling settings that differ from the session's
    (guidance, steps, sampler, start); `timings`: this run's (default: the session's, every
    stage of an edit).

    All of them are written into a temporary folder first, then moved into place, so a run
    that fails (a full disk) or is interrupted leaves the complete set or nothing of it:

    - `out` does not exist: the folder `.NAME.tmp-XXXX` beside it becomes `out` in one rename.
    - `out` exists (a folder the user named, or one holding this edit's session): the files
      are written in `out/.imagic-tmp-XXXX`; then an earlier output there (the files its
      manifest.json lists) is removed, and the new files are moved in, manifest.json last.
      Anything else in `out` stays: a session folder, the user's own files (one with the name
      of a new output is replaced).

    A write that fails raises OSError naming the file it was writing."""
    out = check_out_dir(out)
    images: dict[str, object] = {}
    files = []
    strategies = list(dict.fromkeys(r.forget for r in results))
    several = len(strategies) > 1  # forget "auto": one sweep per strategy, named apart
    for r in results:
        name = f"eta{r.eta:.2f}_seed{r.seed}" + (f"_forget-{r.forget}" if several else "")
        images[name + ".png"] = r.image
        files.append({"file": name + ".png", "eta": r.eta, "seed": r.seed,
                      **({"forget": r.forget} if several else {})})
    for seed, choice in (choices or {}).items():
        chosen = next(r for r in results if r.seed == seed and r.eta == choice.eta
                      and (r.forget == choice.forget or not several))
        images[f"auto_seed{seed}.png"] = chosen.image
        files.append({"file": f"auto_seed{seed}.png", "eta": choice.eta, "seed": seed,
                      "auto": True, **({"forget": choice.forget} if several else {})})
    start = (stage3 or {}).get("start", session.config.start)
    if several:  # a row per (seed, strategy)
        rows = [(seed, s) for seed in seeds for s in strategies]
        labels = [f"seed {seed}\n{s}" for seed, s in rows]
        cells = {((r.seed, r.forget), r.eta): r.image for r in results}
    else:
        rows, cells = list(seeds), {(r.seed, r.eta): r.image for r in results}
        labels = ["inversion"] if start == "inversion" else None
    images["grid.png"] = make_grid(session.input_image, cells, rows, etas, title=session.text,
                                   row_labels=labels)
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
    existed = out.is_dir()
    try:
        if existed:
            staging = Path(tempfile.mkdtemp(prefix=".imagic-tmp-", dir=out))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise write_error(err, out) from None
    try:
        for name, image in images.items():
            _write(save_atomic, image, staging, out, name)
        _write(write_text_atomic, json.dumps(manifest, indent=2) + "\n", staging, out, MANIFEST)
        if existed:
            _move_files(staging, out)
        else:
            try:
                follow_umask(staging)
                staging.rename(out)
            except OSError as err:
                raise write_error(err, out) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write(save, content, staging: Path, out: Path, name: str) -> None:
    try:
        save(content, staging / name)
    except OSError as err:
        raise write_error(err, out / name) from None


def _move_files(staging: Path, out: Path) -> None:
    """Move the complete set in `staging` into the existing folder `out`: the earlier output's
    manifest goes first (no manifest ever describes a half-moved set), then its files, then
    the new files, the new manifest last. Renames in one folder need no space."""
    earlier = _earlier_output(out)
    new = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST)
    try:
        if earlier:
            (out / MANIFEST).unlink(missing_ok=True)
        for name in earlier - {*new, MANIFEST}:
            (out / name).unlink(missing_ok=True)
        for name in [*new, MANIFEST]:
            os.replace(staging / name, out / name)
        staging.rmdir()
    except OSError as err:
        raise write_error(err, out) from None


def _earlier_output(out: Path) -> set[str]:
    """The files of an earlier `imagic edit` or `imagic generate` in `out`, as its manifest
    lists them (plain names inside `out` only); empty when there is none."""
    if not (out / MANIFEST).is_file():  # only a regular file is read: a FIFO would block
        return set()
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or manifest.get("command") not in ("edit", "generate"):
        return set()
    images = manifest.get("images") if isinstance(manifest.get("images"), list) else []
    listed = [i.get("file") for i in images if isinstance(i, dict)]
    listed.append(manifest.get("grid"))
    return {MANIFEST} | {name for name in listed if isinstance(name, str) and name
                         and name == Path(name).name and not name.startswith(".")}


def time_and_memory(timings: dict[str, float]) -> str:
    """One line for the end of an edit: each stage's seconds and, on a GPU, the peak memory
    (the largest of the stages' `torch.cuda.max_memory_allocated`)."""
    stages = [("stage1", "stage 1"), ("stage2", "stage 2"), ("generate", "stage 3")]
    line = "time: " + ", ".join(f"{label} {timings[f'{key}_s']:.1f} s"
                                for key, label in stages if f"{key}_s" in timings)
    peaks = [v for k, v in timings.items() if k.endswith("_peak_gib")]
    return line + (f"; peak GPU memory {max(peaks):.1f} GiB" if peaks else "")
