"""An edit's output folder: where it may go, and what is written there.

    eta0.70_seed0.png ...   one image per (η, seed)
    auto_seedS.png          with --eta auto: the image chosen for seed S
    grid.png                the input beside every output, labelled with η and seed
    manifest.json           text, model, config, images, auto-η's signals, timings, versions

Every file is written under a temporary name and renamed into place. The session itself is
`session.py`'s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import InputError
from .images import make_grid, save_atomic, write_text_atomic
from .session import EditSession, library_versions


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
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


def check_session_dir(path: str | os.PathLike, out: Path) -> Path:
    """Where an edit saves its session: writable, not a folder of something else, and not the
    output folder itself (both hold a manifest.json)."""
    path = Path(path)
    check_out_dir(path, "--session")
    if path.resolve() == out.resolve():
        raise InputError("--session and --out are the same folder; the session needs its own "
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
    """A re-render's default folder: SESSION-render-N beside the session, the first N not taken,
    so a re-render never writes over the edit's outputs or an earlier re-render."""
    session = Path(session)
    n = 1
    while (session.parent / f"{session.name}-render-{n}").exists():
        n += 1
    return session.parent / f"{session.name}-render-{n}"


def write_outputs(out: Path, session: EditSession, results, etas, seeds, extra: dict,
                  choices=None, stage3: dict | None = None,
                  timings: dict | None = None) -> None:
    """One PNG per (η, seed), grid.png and manifest.json; with auto-η `choices` also
    auto_seedS.png (the chosen image) and the signals behind each choice. `extra`: what made
    them (command, paths); `stage3`: sampling settings that differ from the session's
    (guidance, steps, sampler, start); `timings`: this run's (default: the session's, every
    stage of an edit)."""
    out = check_out_dir(out)
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


def time_and_memory(timings: dict[str, float]) -> str:
    """One line for the end of an edit: each stage's seconds and, on a GPU, the peak memory
    (the largest of the stages' `torch.cuda.max_memory_allocated`)."""
    stages = [("stage1", "stage 1"), ("stage2", "stage 2"), ("generate", "stage 3")]
    line = "time: " + ", ".join(f"{label} {timings[f'{key}_s']:.1f} s"
                                for key, label in stages if f"{key}_s" in timings)
    peaks = [v for k, v in timings.items() if k.endswith("_peak_gib")]
    return line + (f"; peak GPU memory {max(peaks):.1f} GiB" if peaks else "")
