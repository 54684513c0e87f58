"""Benchmarks of edit quality: ShapesBench (offline, analytic) and TEdBench (CLIP score, LPIPS)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError
from ..images import write_text_atomic
from ..presets import EditConfig


def checkout_commit() -> str:
    """The commit of the checkout imagic runs from, or "" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(command: list[str], device: str = "cpu") -> dict:
    """Where a benchmark script's figures came from: its command line, the checkout's commit,
    torch's version, the device it ran on and the UTC date, for the JSON its docs table cites."""
    import torch

    from ..backends import device_name

    return {"command": " ".join(command), "commit": checkout_commit(), "torch": torch.__version__,
            "machine": device_name(torch.device(device)),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def write_report(out: str | None, script: str, argv: list[str], device: str, **fields) -> None:
    """A benchmark script's JSON at `out` (nothing when None): its provenance, then `fields`."""
    if out:
        report = {**provenance([script, *argv], device), **fields}
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


def run_script(main: Callable[[], int]) -> None:
    """A benchmark script's entry point: main()'s exit status; bad input is one line and 2."""
    import sys

    try:
        sys.exit(main())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_same_run(out: Path, settings: dict, backend) -> None:
    """A folder holds one sweep of one model and recipe: resuming with other settings would mix
    them in the summary, so it is refused (OUT/run.json records them with the model's identity)."""
    model = {k: backend.identity.get(k) for k in ("family", "fingerprint")}
    settings = {**settings, "model": model}
    record = out / "run.json"
    if record.exists():
        stored = json.loads(record.read_text())
        if isinstance(stored.get("config"), dict):  # fields added since take their defaults
            stored["config"] = {**EditConfig().to_dict(), **stored["config"]}
        if json.loads(json.dumps(stored)) != json.loads(json.dumps(settings)):
            raise InputError(f"{out} holds a run with other settings (sweep, recipe, data or "
                             f"model; see {record}): choose another --out to compare")
    else:
        write_text_atomic(json.dumps(settings, indent=2) + "\n", record)


@contextmanager
def append_rows(path: Path, fields: tuple[str, ...],
                exclusive: bool = False) -> Iterator[Callable[[list[dict]], None]]:
    """Open a benchmark's rows.csv for appending (header written when new, refused when the file
    has other columns); yields `commit(rows)`, which writes one finished unit of rows and syncs
    it to disk, so a stopped run resumes from whole units. `exclusive`: hold a lock on the file
    meanwhile, for processes that append to one file."""
    if exclusive:
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            with append_rows(path, fields) as commit:
                yield commit
        return
    new_file = not path.exists()
    if not new_file:
        with path.open(newline="") as f:
            if tuple(next(csv.reader(f), ())) != fields:
                raise InputError(f"{path} has the columns of another imagic version: choose "
                                 f"another --out (or move the file away)")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()

        def commit(rows: list[dict]) -> None:
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

        yield commit


def read_rows_csv(path: Path, convert: Callable[[dict], None], name: str) -> list[dict]:
    """The rows of a benchmark's rows.csv, each typed in place by `convert`; one clear line
    (InputError) for a file that is not one, or was cut short."""
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            convert(row)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} is not a {name} rows.csv of imagic, or was cut short "
                         f"({type(err).__name__}: {err}): move it away or choose another "
                         f"--out") from None
    return rows


def require_plotting() -> None:
    """The benchmarks end with a plot: say so before hours of work rather than after."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("the benchmarks draw their plots with matplotlib, which is not "
                         "installed: pip install 'imagic[bench]' (or matplotlib)")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG under a temporary name, then rename it into place."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
