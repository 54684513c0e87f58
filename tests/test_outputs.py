"""Honest outputs: an edit's files are a set (all of them or none), a run holds its folder so a
second run stops at once, files follow the umask, and a full disk, a read-only place or no
memory ends the command in one line (exit 1; a bad --out is a bad input, exit 2)."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagic
from conftest import make_photo
from imagic.cli import main
from imagic.outputs import lock_output, next_render_dir
from imagic.session import EditSession

FAST = ["--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "3", "--quiet"]
SRC = str(Path(imagic.__file__).resolve().parents[1])

# `imagic edit` in a child process whose files may not grow past a size (RLIMIT_FSIZE), from
# the start or only once the session is saved. SIGXFSZ is ignored, so a write past the limit
# fails with EFBIG ("File too large") as on a full disk, instead of killing the process.
LIMITED = """
import resource, signal, sys
from imagic.cli import main
from imagic.session import EditSession

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit, when, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]

def fill_the_disk():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

if when == "start":
    fill_the_disk()
else:  # once the session is saved
    save = EditSession.save
    def save_then_fill(self, path):
        saved = save(self, path)
        fill_the_disk()
        return saved
    EditSession.save = save_then_fill
sys.exit(main(args))
"""

# `imagic edit` in a child process that stops before training until the test lets it go
GATED = """
import sys, time
from pathlib import Path
from imagic.cli import main
from imagic.editor import Imagic

ready, go, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
fit = Imagic.fit
def gated_fit(*a, **k):
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
    return fit(*a, **k)
Imagic.fit = gated_fit
sys.exit(main(args))
"""


def child(script, *args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def work(tmp_path, photo_path):
    """An empty folder to run in, the photo beside it."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------- a full disk
# Sizes with the tiny test model (tests/conftest.py): the session's delta.safetensors is about
# 228 kB, each 64 px output PNG about 12 kB, grid.png (two η, cells enlarged to 128 px) 26 kB.
SESSION_DOES_NOT_FIT = 100_000  # the delta fails; every image would fit
GRID_DOES_NOT_FIT = 16_000  # the images fit, the grid (written after them) does not


def test_a_full_disk_during_the_session_save_is_one_line_and_leaves_nothing(
        work, photo_path, tiny_model_dir):
    run = child(LIMITED, SESSION_DOES_NOT_FIT, "start", "edit", photo_path, "a red cat",
                "--model", tiny_model_dir, "--eta", "0,1", "--out", work / "out", *FAST,
                cwd=work)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 1, err
    line = one_line(err)
    assert line.startswith(f"imagic: error: could not write {work / 'out' / 'session'}: "
                           "File too large"), line
    assert "ulimit -f" in line
    assert everything(work) == []  # no session, no output folder, no temporary, no lock


@pytest.mark.parametrize("session", ["in-out", "elsewhere"])
def test_a_full_disk_while_writing_images_keeps_the_session_and_writes_no_image(
        work, photo_path, tiny_model_dir, session):
    out = work / "out"
    session_dir = out / "session" if session == "in-out" else work / "s"
    run = child(LIMITED, GRID_DOES_NOT_FIT, "after-session", "edit", photo_path, "a red cat",
                "--model", tiny_model_dir, "--eta", "0,1", "--out", out,
                *(["--session", session_dir] if session == "elsewhere" else []), *FAST,
                cwd=work)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 1, err
    line = one_line(err)
    # the images were written before the grid failed: without the set they would be left
    assert line.startswith(f"imagic: error: could not write {out / 'grid.png'}: File too "
                           "large"), line
    assert f"the session is saved in {session_dir}" in line
    # the training is kept, and loads; of the outputs nothing at all
    loaded = EditSession.load(session_dir)
    assert loaded.text == "a red cat" and loaded.delta.tensors
    if session == "in-out":
        assert everything(work) == ["out", "out/session", *sorted(
            f"out/session/{p.name}" for p in session_dir.iterdir())]
    else:
        assert everything(work) == ["s", *sorted(f"s/{p.name}" for p in session_dir.iterdir())]


# ------------------------------------------------------------------- two runs, one folder


def test_a_second_run_on_the_same_out_stops_at_once_and_the_first_completes(
        work, photo_path, tiny_model_dir, capsys, monkeypatch):
    out = work / "out"
    ready, go = work.parent / "ready", work.parent / "go"
    first = child(GATED, ready, go, "edit", photo_path, "a red cat", "--model", tiny_model_dir,
                  "--eta", "0,1", "--out", out, *FAST, cwd=work)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # the first run holds the folder and is about to train
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.1)
        monkeypatch.chdir(work)
        for spelling in (out, "out", "../work/out"):  # one folder, however it is written
            assert main(["edit", str(photo_path), "a red cat", "--model", str(tiny_model_dir),
                         "--out", str(spelling), *FAST]) == 2
            line = one_line(capsys.readouterr().err)
            assert f"--out {spelling}" in line and "being written by another imagic run" in line
            assert "(lock " in line and "wait for it or choose another --out" in line
        assert not out.exists()  # the second run wrote nothing
    finally:
        go.touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    names = {p.name for p in out.iterdir()}
    assert names == {"eta0.00_seed0.png", "eta1.00_seed0.png", "grid.png", "manifest.json",
                     "session"}
    assert everything(work) == sorted(["out", *(f"out/{n}" for n in names),
                                       *(f"out/session/{p.name}"
                                         for p in (out / "session").iterdir())])  # no lock


def test_a_session_folder_being_written_is_refused_too(work, photo_path, tiny_model_dir,
                                                       capsys):
    with lock_output(work / "s", "--session") as lock:
        assert lock == work.resolve() / ".s.lock" and lock.exists()
        assert main(["edit", str(photo_path), "a red cat", "--model", str(tiny_model_dir),
                     "--out", str(work / "out"), "--session", str(work / "s"), *FAST]) == 2
        line = one_line(capsys.readouterr().err)
        assert "--session" in line and "another imagic run" in line
        assert everything(work) == [".s.lock"]
    assert everything(work) == []  # the lock is removed with it


def test_a_rerender_without_out_skips_a_folder_being_written(tmp_path):
    session = tmp_path / "s"
    assert next_render_dir(session) == tmp_path / "s-render-1"
    with lock_output(tmp_path / "s-render-1"):
        assert next_render_dir(session) == tmp_path / "s-render-2"


# --------------------------------------------------- the umask, and an existing --out


@pytest.fixture(scope="module")
def edited(tmp_path_factory, tiny_model_dir):
    """An edit's --out with its session inside, made once under umask 022."""
    folder = tmp_path_factory.mktemp("edited")
    make_photo().save(folder / "photo.png")
    previous = os.umask(0o022)
    try:
        assert main(["edit", str(folder / "photo.png"), "a red cat", "--model",
                     str(tiny_model_dir), "--eta", "0,1", "--out", str(folder / "out"),
                     *FAST]) == 0
    finally:
        os.umask(previous)
    return folder / "out"


def test_outputs_follow_the_umask_and_replace_an_earlier_output_as_a_whole(edited, tmp_path):
    for path in [edited, *edited.rglob("*")]:  # the edit's outputs and session, umask 022
        assert mode(path) == (0o755 if path.is_dir() else 0o644), path
    out = tmp_path / "out"
    shutil.copytree(edited, out)
    # the user's own file in --out; a re-render there replaces the edit's set, not it
    (out / "notes.txt").write_text("mine")
    previous = os.umask(0o077)
    try:
        assert main(["generate", str(out / "session"), "--eta", "0.5", "--out", str(out),
                     "--quiet"]) == 0
        render = tmp_path / "render"
        assert main(["generate", str(out / "session"), "--eta", "1", "--out", str(render),
                     "--quiet"]) == 0
    finally:
        os.umask(previous)
    names = {p.name for p in out.iterdir()}
    assert names == {"eta0.50_seed0.png", "grid.png", "manifest.json", "session", "notes.txt"}
    assert json.loads((out / "manifest.json").read_text())["command"] == "generate"
    for name in ("eta0.50_seed0.png", "grid.png", "manifest.json"):
        assert mode(out / name) == 0o600
    assert mode(out / "notes.txt") == 0o644 and mode(out / "session") == 0o755
    assert mode(render) == 0o700 and {mode(p) for p in render.iterdir()} == {0o600}
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary folder, file or lock left


@pytest.mark.parametrize("failure, code", [
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (KeyboardInterrupt(), 130),
])
def test_a_rerender_that_fails_leaves_the_earlier_output_whole(edited, tmp_path, capsys,
                                                               monkeypatch, failure, code):
    import imagic.outputs

    out = tmp_path / "out"
    shutil.copytree(edited, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    written = []
    save = imagic.outputs.save_atomic

    def save_until_the_grid(image, path):
        if Path(path).name == "grid.png":
            raise failure
        save(image, path)
        written.append(Path(path).name)

    monkeypatch.setattr(imagic.outputs, "save_atomic", save_until_the_grid)
    assert main(["generate", str(out / "session"), "--eta", "0,0.5", "--out", str(out),
                 "--quiet"]) == code
    line = one_line(capsys.readouterr().err)
    assert written == ["eta0.00_seed0.png", "eta0.50_seed0.png"]  # then the grid failed
    if code == 1:
        assert line == (f"imagic: error: could not write {out / 'grid.png'}: No space left on "
                        "device; free some space or write elsewhere")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # the earlier set, byte for byte: nothing new, nothing removed
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "session"])
    assert not [p for p in tmp_path.rglob(".*")]


def test_two_saves_of_one_session_that_meet_leave_no_orphan(edited, tmp_path, monkeypatch):
    """The race of two saves without the command line's lock: while one moves the earlier
    session aside, the other puts its own in place. The first fails (one OSError naming the
    folder) and leaves no copy behind."""
    session = EditSession.load(edited / "session")
    path = tmp_path / "s"
    session.save(path)
    rename = Path.rename

    def another_save_meanwhile(self, target):
        moved = rename(self, target)
        if self == path:  # the earlier session is aside: the other save lands now
            session.save(path)
        return moved

    monkeypatch.setattr(Path, "rename", another_save_meanwhile)
    with pytest.raises(OSError) as failed:
        session.save(path)
    monkeypatch.undo()
    assert failed.value.filename == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no .s.* folder left
    assert EditSession.load(path).text == "a red cat"


# ----------------------------------------------------------------- a --out that can't be


def test_an_out_where_no_file_can_be_made_is_refused_before_training(
        work, photo_path, tiny_model_dir, capsys, monkeypatch):
    """Root may write anywhere by os.access, /proc included; making a file there fails."""
    monkeypatch.chdir(work)
    if Path("/proc/self").is_dir():
        assert main(["edit", str(photo_path), "a red cat", "--model", str(tiny_model_dir),
                     "--out", "/proc/imagic-test", *FAST]) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("imagic: error: --out /proc/imagic-test: /proc is not writable (")
        assert not Path("/proc/imagic-test").exists()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert main(["edit", str(photo_path), "a red cat", "--model", str(tiny_model_dir),
                 "--out", "new/out", *FAST]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (f"imagic: error: --out new/out: {Path('.')} is not writable "
                    "(Permission denied)")
    assert everything(work) == []


# ------------------------------------------------------------- one line for the machine


@pytest.mark.parametrize("error, message", [
    (OSError(errno.ENOSPC, "No space left on device", "imagic-out/grid.png"),
     "could not write imagic-out/grid.png: No space left on device; free some space or write "
     "elsewhere"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "o/eta1.00_seed0.png"),
     "could not write o/eta1.00_seed0.png: Disk quota exceeded; free some space"),
    (OSError(errno.EROFS, "Read-only file system", "o/manifest.json"),
     "could not write o/manifest.json: Read-only file system; the file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied", "o/session"),
     "o/session: Permission denied; check the permissions"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    (MemoryError(), "ran out of memory (RAM); --low-memory needs less"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 4096 bytes. Error code 12 (Cannot "
                  "allocate memory)\nmore"),
     "ran out of memory (RAM); --low-memory needs less"),
])
def test_the_machine_failing_is_one_line_and_exit_1(capsys, monkeypatch, error, message):
    import imagic.cli.edit

    def edit_on_a_full_machine(args):
        raise error

    monkeypatch.setattr(imagic.cli.edit, "cmd_edit", edit_on_a_full_machine)
    assert main(["edit", "photo.png", "a dog"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"imagic: error: {message}"), line


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    import imagic.cli.edit

    def a_bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(imagic.cli.edit, "cmd_edit", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["edit", "photo.png", "a dog"])
