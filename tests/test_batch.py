"""`imagic batch` on the embedded model at reduced steps: every job once, a re-run redoes none,
bad jobs are refused up front with their lines, a failing job is recorded and the others go on,
two processes share the work, and a killed run resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagic.cli import main
from imagic.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEXTS = {"large-red-circle-top-left": "a large blue circle at the top left",
         "small-yellow-square-center": "a small yellow circle at the center",
         "large-green-triangle-bottom-right": "a large green square at the bottom right"}
FAST = ["--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "2", "--no-session"]


def write_jobs(path: Path, count: int = 6, extra: list[str] = ()) -> list[str]:
    """`count` jobs over the three examples (two η per job), one per line; their ids."""
    lines, ids = [], []
    for i in range(count):
        name = list(TEXTS)[i % 3]
        ids.append(f"job{i}")
        lines.append(json.dumps({"id": ids[-1], "image": str(EXAMPLES / f"{name}.png"),
                                 "text": TEXTS[name], "eta": [0.9, 1.1 + 0.1 * (i // 3)]}))
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return ids


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p))
            for p in sorted(folder.glob("job*/eta*.png"))}


def batch_process(jobs: Path, out: Path, processes: int = 0) -> subprocess.Popen:
    """`imagic batch` in a process of its own, or under `accelerate launch` with `processes`
    processes (on CPUs, accelerate starts them through torchrun)."""
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend",
              "no", "--num_machines", "1", "--main_process_port", "29517"] if processes else [
              sys.executable]
    return subprocess.Popen([*launch, "-m", "imagic", "batch", str(jobs), "--out", str(out),
                             *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_job_runs_once_and_a_rerun_redoes_none(tmp_path, monkeypatch, capsys):
    from imagic.editor import Imagic

    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    ids = write_jobs(jobs)
    assert main(["batch", str(jobs), "--out", str(out), *FAST]) == 0
    for job_id in ids:
        manifest = json.loads((out / job_id / "manifest.json").read_text())
        assert manifest["id"] == job_id and len(manifest["images"]) == 2
    assert "6 done, 0 skipped, 0 failed" in capsys.readouterr().out
    monkeypatch.setattr(Imagic, "fit", lambda *a, **k: pytest.fail("a done job ran again"))
    assert main(["batch", str(jobs), "--out", str(out), *FAST]) == 0
    assert "0 done, 6 skipped, 0 failed" in capsys.readouterr().out


def test_bad_jobs_are_refused_up_front_with_their_lines(tmp_path, capsys):
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_jobs(jobs, 2, extra=["{not json", json.dumps({"image": "nowhere.png", "text": "x"}),
                               json.dumps({"id": "job0", "image": str(EXAMPLES / (
                                   "small-yellow-square-center.png")), "text": "a circle"})])
    assert main(["batch", str(jobs), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 bad job(s)" in err
    assert "line 3: not valid JSON" in err and "line 4:" in err and "nowhere.png" in err
    assert "line 5: the id 'job0' is given twice" in err
    assert not out.exists()
    assert main(["batch", str(jobs), "--out", str(out), "--skip-bad", *FAST]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["job0",
                                                                                  "job1"]
    with pytest.raises(InputError, match="no such jobs file"):
        from imagic.batch import read_jobs
        read_jobs(tmp_path / "missing.jsonl")


def test_a_failing_job_is_recorded_and_the_others_complete(tmp_path, monkeypatch, capsys):
    from imagic.editor import Imagic

    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    write_jobs(jobs, 3)
    fit = Imagic.fit

    def fails_on_yellow(self, image, text, *args, **kwargs):
        if "yellow" in text:
            raise InputError("the model cannot draw yellow today")
        return fit(self, image, text, *args, **kwargs)

    monkeypatch.setattr(Imagic, "fit", fails_on_yellow)
    assert main(["batch", str(jobs), "--out", str(out), *FAST]) == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["line"]) for f in failures] == [("job1", 2)]
    assert "cannot draw yellow" in failures[0]["error"]
    assert (out / "job0" / "manifest.json").is_file() and (out / "job2" / "manifest.json").is_file()
    assert not (out / "job1").exists()
    monkeypatch.setattr(Imagic, "fit", fit)  # the next run tries the failed job again
    assert main(["batch", str(jobs), "--out", str(out), *FAST]) == 0
    assert (out / "job1" / "manifest.json").is_file()


def test_two_processes_under_accelerate_share_the_jobs_and_make_the_same_images(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs)
    alone = batch_process(jobs, tmp_path / "one")  # the same settings as the pair (threads)
    assert alone.wait(timeout=600) == 0, alone.communicate()
    pair = batch_process(jobs, tmp_path / "two", processes=2)
    out, err = pair.communicate(timeout=600)
    assert pair.returncode == 0, err[-2000:]
    done = {line.split(":")[0]: int(line.split(": ")[1].split(" done")[0])
            for line in out.splitlines() if line.startswith("process ")}
    assert set(done) == {"process 0", "process 1"} and sum(done.values()) == 6  # each once
    single, shared = images(tmp_path / "one"), images(tmp_path / "two")
    assert single.keys() == shared.keys() and len(single) == 12
    assert all(np.array_equal(single[k], shared[k]) for k in single)


def test_a_killed_run_resumes_without_redoing_done_jobs(tmp_path):
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    ids = write_jobs(jobs)
    first = batch_process(jobs, out)
    deadline = time.monotonic() + 300
    while not (out / ids[0] / "manifest.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {i: (out / i / "manifest.json").stat().st_mtime_ns for i in ids
            if (out / i / "manifest.json").is_file()}
    assert 1 <= len(done) < len(ids)
    assert main(["batch", str(jobs), "--out", str(out), *FAST]) == 0
    assert all((out / i / "manifest.json").is_file() for i in ids)
    assert all((out / i / "manifest.json").stat().st_mtime_ns == t for i, t in done.items())
