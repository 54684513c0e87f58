"""Benchmarks of edit quality: ShapesBench (offline, analytic) and TEdBench (CLIP score, LPIPS)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..images import write_text_atomic


def check_same_run(out: Path, settings: dict) -> None:
    """A folder holds one sweep of one model and recipe: resuming with other settings would mix
    them in the summary, so it is refused (OUT/run.json records them)."""
    record = out / "run.json"
    if record.exists():
        if json.loads(record.read_text()) != json.loads(json.dumps(settings)):
            raise InputError(f"{out} holds a run with other settings (sweep, recipe or model; "
                             f"see {record}): choose another --out to compare")
    else:
        write_text_atomic(json.dumps(settings, indent=2) + "\n", record)
