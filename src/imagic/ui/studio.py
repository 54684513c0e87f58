"""What the web page does, without the page: edits, re-renders and saved sessions on one warm model.

A `Studio` holds the loaded backend and a folder of saved edits. Each edit is an *entry*, laid out
as `imagic edit --out ENTRY` lays out its output folder: the images, grid.png and manifest.json of
the latest render, the session in `ENTRY/session` (so `imagic generate ENTRY/session` works on it),
and `session.zip` for download. Everything the Studio writes lies inside its sessions folder.

Work on the model runs one job at a time, each in a thread of its own (`Studio.start`), so the
page can poll it for the stage and the running loss and cancel it. A cancel raises `Cancelled`
in the job's thread while it computes (stages 1-3, the way Ctrl-C stops `imagic edit`), never
while it writes: an entry is written into a hidden folder and renamed into place, and a render's
files replace the earlier ones as a set (`outputs.write_outputs`).
"""

from __future__ import annotations

import contextvars
import ctypes
import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..auto_eta import AutoChoice, choose_etas
from ..editor import EditImage, Imagic, check_text
from ..errors import ImagicError, InputError, SessionError
from ..images import file_sha256, follow_umask, load_image
from ..outputs import lock_output, write_outputs
from ..presets import EditConfig, get_preset
from ..session import EditSession

SESSION = "session"  # an entry's session folder, as `imagic edit` names it
ZIP = "session.zip"
OPEN_SESSIONS = 3  # sessions kept in memory for re-rendering (an SD full fine-tune is GBs)


def default_sessions_dir() -> Path:
    """`$XDG_CACHE_HOME/imagic/ui-sessions`, or `~/.cache/imagic/ui-sessions`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "imagic" / "ui-sessions"


class Cancelled(BaseException):  # noqa: N818 - a BaseException, like KeyboardInterrupt
    """Raised in a job's thread by `Studio.cancel`. A BaseException, so the engine handles it as
    it handles Ctrl-C (`Imagic.fit` gives the base model back) and nothing catches it as an
    error on the way up."""


# --------------------------------------------------------------------------- what the page shows


@dataclass
class EditRequest:
    """An edit the user asked for, parsed and checked, ready to queue."""

    image: Image.Image
    image_sha256: str
    text: str
    config: EditConfig
    auto: bool  # η "auto": sweep and pick one η per seed
    warnings: list[str] = field(default_factory=list)


@dataclass
class Shown:
    """One rendered image as the gallery shows it."""

    file: Path
    eta: float
    seed: int
    auto: bool = False  # the η that auto-η picked for this seed

    @property
    def caption(self) -> str:
        return f"η {self.eta:g} · seed {self.seed}" + (" · auto pick" if self.auto else "")


@dataclass
class Render:
    """An entry after an edit, a re-render or a reopen."""

    name: str
    text: str
    model: str
    images: list[Shown]  # by seed, then η
    grid: Path | None
    session_zip: Path
    etas: list[float]
    seeds: list[int]
    info: str  # recipe, timings and final losses, one line each

    @property
    def chosen(self) -> Shown | None:
        """The image a download takes unless the user picks another: auto-η's pick, else the
        last one."""
        picks = [s for s in self.images if s.auto]
        return picks[0] if picks else (self.images[-1] if self.images else None)


@dataclass
class Entry:
    """A saved edit as the sessions list shows it; `broken` says why it cannot be opened."""

    name: str
    text: str = ""
    model: str = ""
    input_image: Path | None = None
    broken: str | None = None


@dataclass
class _Open:
    """A session in memory, with every image rendered from it so far."""

    session: EditSession
    images: dict[tuple[int, float], Image.Image]  # (seed, η) -> image
    etas: list[float]
    seeds: list[int]
    choices: dict[int, AutoChoice]


def refuse_forget_auto(config: EditConfig) -> None:
    """The page shows one image per (seed, η); forget "auto" renders one per strategy too."""
    if config.forget == "auto":
        raise InputError("forget auto renders the η values once per forgetting strategy, which "
                         "the page does not show: use `imagic edit/generate --forget auto`, or "
                         "pick one strategy")


# --------------------------------------------------------------------------- jobs


class Job:
    """One piece of work on the model, run in its own thread; `status()` says where it is."""

    def __init__(self, owner: str, work: Callable[[Job], object]):
        self.owner = owner
        self.cancelled = False
        self.waiting = True  # for the device: another job holds it
        self.done = threading.Event()
        self._work = work
        self._result: object = None
        self._error: BaseException | None = None
        self._thread_id: int | None = None
        self._computing = False
        self._lock = threading.Lock()

    def result(self):
        """The work's result once `done` is set; re-raises its error (Cancelled included)."""
        if self._error is not None:
            raise self._error
        return self._result

    @contextmanager
    def computing(self) -> Iterator[None]:
        """The span in which `cancel` may stop this job: the model's work, not the writing."""
        with self._lock:
            if self.cancelled:
                raise Cancelled
            self._thread_id = threading.get_ident()
            self._computing = True
        try:
            yield
        finally:
            with self._lock:
                self._computing = False
                # a cancel sent just before the span ended must not fire during the writing
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread_id), None)

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            if self._computing:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread_id),
                                                           ctypes.py_object(Cancelled))


# --------------------------------------------------------------------------- the studio


class Studio:
    """The loaded model, the sessions folder, and the jobs on the model (one at a time)."""

    def __init__(self, backend, sessions_dir: str | os.PathLike, preset: str | None = None):
        self.backend = backend
        self.sessions_dir = Path(sessions_dir).expanduser().resolve()
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.preset = preset or backend.default_preset
        get_preset(self.preset)  # an unknown name fails here, before the page starts
        self.model = backend.identity.get("source") or backend.identity.get("name", "?")
        self._device = threading.Lock()
        self._jobs: list[Job] = []
        self._jobs_lock = threading.Lock()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._failed: dict[str, str] = {}  # entries that failed to open, and why

    # ----------------------------------------------------------------- checks (no model work)

    def check_edit(self, image_path: str | os.PathLike | None, text: str, preset: str | None,
                   options: dict) -> EditRequest:
        """The image, text and recipe as `imagic edit` checks them; InputError otherwise.
        `options` are EditConfig fields (None: the preset's), plus etas "auto"."""
        if not image_path:
            raise InputError("upload an image or pick an example first")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = load_image(image_path, min_side=1)  # the model's own minimum: in fit
            text = check_text(self.backend, text)
            config = get_preset(preset or self.preset).with_options(**options)
        refuse_forget_auto(config)
        return EditRequest(image, file_sha256(image_path), text, config,
                           auto=options.get("etas") == "auto",
                           warnings=[str(w.message) for w in caught])

    def check_image(self, image_path: str | os.PathLike) -> Image.Image:
        """The image as `imagic edit` reads it; InputError with the CLI's line otherwise."""
        return load_image(image_path, min_side=1)

    def preset_values(self, preset: str | None) -> EditConfig:
        return get_preset(preset or self.preset)

    # ----------------------------------------------------------------- jobs

    def start(self, owner: str, work: Callable[[Job], object]) -> Job:
        """Run `work(job)` in a new thread once the device is free; the thread sees the caller's
        context (so Gradio's progress tracking follows the engine's tqdm bars into it)."""
        job = Job(owner, work)
        context = contextvars.copy_context()
        with self._jobs_lock:
            self._jobs.append(job)

        def run() -> None:
            try:
                with self._device:
                    job.waiting = False
                    job._result = work(job)
            except BaseException as err:  # handed to the page by `Job.result`
                job._error = err
            finally:
                with self._jobs_lock:
                    self._jobs.remove(job)
                job.done.set()

        threading.Thread(target=context.run, args=(run,), name=f"imagic-job-{owner}",
                         daemon=True).start()
        return job

    def cancel(self, owner: str) -> bool:
        """Cancel the jobs of `owner` (a browser tab); True if there was one."""
        with self._jobs_lock:
            jobs = [job for job in self._jobs if job.owner == owner]
        for job in jobs:
            job.cancel()
        return bool(jobs)

    # ----------------------------------------------------------------- edit and render

    def edit(self, request: EditRequest, job: Job | None = None) -> Render:
        """Stages 1-3 and, if auto-η, its pick; then the entry is written as a whole."""
        with job.computing() if job else nullcontext():
            editor = Imagic(self.backend, request.config)
            session = editor.fit(request.image, request.text, image_sha256=request.image_sha256)
            results = editor.generate(session)
            choices = choose_etas(self.backend, session, results) if request.auto else None
        # the entry is made in a hidden folder and renamed into place: complete or absent
        name = self._new_name(request.text)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.sessions_dir))
        try:
            session.save(staging / SESSION)
            opened = _Open(session, {(r.seed, r.eta): r.image for r in results},
                           list(request.config.etas), list(request.config.seeds), choices or {})
            self._write(staging, opened, {"command": "edit"})
            _zip_session(staging)
            follow_umask(staging)  # mkdtemp's folder is private; an entry gets the umask's mode
            staging.rename(self.sessions_dir / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        session.folder = self.sessions_dir / name / SESSION
        self._remember(name, opened)
        return self._shown(name, opened)

    def render(self, name: str, eta: float, seeds: Sequence[int],
               job: Job | None = None) -> Render:
        """Stage 3 only: add η (for every seed in `seeds`) to the entry's renders, from the
        session in memory; the entry's images, grid and manifest are rewritten as a set."""
        opened = self._opened(name)
        refuse_forget_auto(opened.session.config)
        etas = sorted({*opened.etas, round(float(eta), 4)})
        seeds = list(dict.fromkeys(seeds)) or opened.seeds
        missing: dict[float, list[int]] = {}
        for e in etas:
            todo = [s for s in seeds if (s, e) not in opened.images]
            if todo:
                missing[e] = todo
        with job.computing() if job else nullcontext():
            editor = Imagic(self.backend, opened.session.config)
            new: list[EditImage] = []
            for e, todo in missing.items():  # one call per η: the missing seeds of that η
                new += editor.generate(opened.session, etas=[e], seeds=todo)
        opened.images.update({(r.seed, r.eta): r.image for r in new})
        opened.etas, opened.seeds = etas, seeds
        with lock_output(self.sessions_dir / name):
            self._write(self.sessions_dir / name, opened,
                        {"command": "generate", "session": SESSION})
        return self._shown(name, opened)

    def progress(self) -> str:
        """The engine's current stage and its running loss, read from its progress bar."""
        from tqdm import tqdm

        bars = [bar for bar in list(getattr(tqdm, "_instances", ()))
                if str(getattr(bar, "desc", "")).startswith("stage")]
        if not bars:
            return ""
        bar = max(bars, key=lambda bar: getattr(bar, "start_t", 0))  # the newest
        postfix = getattr(bar, "postfix", None)  # "loss=0.0123" once a loss was read
        return f"{bar.desc}" + (f" · {postfix.replace('=', ' ')}" if postfix else "")

    def open(self, name: str) -> Render:
        """Reopen a saved entry: its session (checked against the loaded model) and the images
        its last render wrote."""
        return self._shown(name, self._opened(name))

    # ----------------------------------------------------------------- the sessions folder

    def entries(self) -> list[Entry]:
        """Every entry in the sessions folder, newest first; a folder whose session cannot be
        read is listed as broken, with the reason."""
        entries = []
        folders = [p for p in self.sessions_dir.iterdir() if not p.name.startswith(".")]
        for folder in sorted(folders, key=lambda p: p.name, reverse=True):
            entries.append(self._entry(folder))
        return entries

    def _entry(self, folder: Path) -> Entry:
        entry = Entry(folder.name)
        if not folder.is_dir():
            entry.broken = "not a folder"
            return entry
        try:
            manifest = _read_session_manifest(folder / SESSION)
        except ImagicError as err:
            entry.broken = _relative(str(err), self.sessions_dir)
            return entry
        entry.text = manifest["text"]
        entry.model = manifest["model"].get("source") or manifest["model"].get("name", "?")
        if (folder / SESSION / "input.png").is_file():
            entry.input_image = folder / SESSION / "input.png"
        entry.broken = self._failed.get(folder.name)
        return entry

    def entry_folder(self, name: str) -> Path:
        """The folder of entry `name`: a direct child of the sessions folder, nothing else."""
        folder = self.sessions_dir / name
        if not name or name.startswith(".") or Path(name).name != name or not folder.is_dir():
            raise SessionError(f"no saved session named {name!r}")
        return folder

    # ----------------------------------------------------------------- helpers

    def _opened(self, name: str) -> _Open:
        """The entry's session in memory, loading it (and its last render) if needed."""
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        folder = self.entry_folder(name)
        try:
            session = EditSession.load(folder / SESSION)
            session.check_model(self.backend)
        except ImagicError as err:
            self._failed[name] = _relative(str(err), self.sessions_dir)
            raise SessionError(self._failed[name]) from None
        self._failed.pop(name, None)
        opened = _last_render(folder, session)
        if not (folder / ZIP).is_file():
            _zip_session(folder)
        self._remember(name, opened)
        return opened

    def _remember(self, name: str, opened: _Open) -> None:
        self._open[name] = opened
        self._open.move_to_end(name)
        while len(self._open) > OPEN_SESSIONS:
            self._open.popitem(last=False)

    def _new_name(self, text: str) -> str:
        """`YYYYMMDD-HHMMSS-words-of-the-text`, unique in the sessions folder."""
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "edit"
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        name, n = base, 1
        while (self.sessions_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def _write(self, folder: Path, opened: _Open, extra: dict) -> None:
        results = [EditImage(eta, seed, opened.images[(seed, eta)])
                   for seed in opened.seeds for eta in opened.etas]
        choices = {s: c for s, c in opened.choices.items()
                   if s in opened.seeds and c.eta in opened.etas}
        write_outputs(folder, opened.session, results, opened.etas, opened.seeds,
                      extra, choices or None)

    def _shown(self, name: str, opened: _Open) -> Render:
        folder = self.sessions_dir / name
        picks = {s: c.eta for s, c in opened.choices.items()}
        images = [Shown(folder / f"eta{eta:.2f}_seed{seed}.png", eta, seed, picks.get(seed) == eta)
                  for seed in opened.seeds for eta in opened.etas
                  if (seed, eta) in opened.images]
        session = opened.session
        return Render(
            name=name, text=session.text,
            model=session.model.get("source") or session.model.get("name", "?"),
            images=images, grid=folder / "grid.png" if images else None,
            session_zip=folder / ZIP, etas=list(opened.etas), seeds=list(opened.seeds),
            info=_describe(session))


# --------------------------------------------------------------------------- module helpers


def _read_session_manifest(folder: Path) -> dict:
    """A session's manifest, checked, without its tensors (for the list)."""
    if not folder.is_dir():
        raise SessionError(f"{folder.parent} holds no session folder")
    return EditSession.read_manifest(folder)


def _last_render(folder: Path, session: EditSession) -> _Open:
    """The images the entry's manifest.json lists (its last render), as far as they read back;
    none if it has no render."""
    opened = _Open(session, {}, [], [], {})
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        config = manifest["config"]
        etas, seeds = [float(e) for e in config["etas"]], [int(s) for s in config["seeds"]]
        for item in manifest["images"]:
            name = item["file"]
            if item.get("auto") or Path(name).name != name:
                continue
            opened.images[(int(item["seed"]), float(item["eta"]))] = load_image(
                folder / name, min_side=1)
        for choice in manifest.get("auto_eta", []):
            opened.choices[int(choice["seed"])] = AutoChoice.from_dict(choice)
    except (OSError, ValueError, KeyError, TypeError, ImagicError):
        return _Open(session, {}, [], [], {})  # no usable render: start from none
    if all((s, e) in opened.images for s in seeds for e in etas):
        opened.etas, opened.seeds = etas, seeds
    else:
        opened.images, opened.choices = {}, {}
    return opened


def _zip_session(entry: Path) -> Path:
    """`ENTRY/session.zip`: the session folder, stored (its tensors do not compress), written
    under a temporary name and renamed into place."""
    target = entry / ZIP
    fd, tmp = tempfile.mkstemp(prefix=f".{ZIP}.", dir=entry)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for file in sorted((entry / SESSION).iterdir()):
                archive.write(file, f"{SESSION}/{file.name}")
        follow_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _describe(session: EditSession) -> str:
    config = session.config
    lines = [f"**{session.text}** · model `{session.model.get('source', '?')}`",
             f"recipe: stage 1 {config.embed_steps} steps at lr {config.embed_lr:g}, stage 2 "
             f"{config.finetune} {config.finetune_steps} steps, guidance {config.guidance:g}, "
             f"{config.sample_steps} {config.sampler} steps from {config.start}"]
    times = [f"{label} {session.timings[key]:.1f} s" for key, label in
             (("stage1_s", "stage 1"), ("stage2_s", "stage 2"), ("generate_s", "stage 3"))
             if key in session.timings]
    if times:
        lines.append("time: " + ", ".join(times))
    losses = [f"{k} {v[-1]:.4f}" for k, v in session.losses.items() if v]
    if losses:
        lines.append("final loss: " + ", ".join(losses))
    return "  \n".join(lines)


def _relative(message: str, root: Path) -> str:
    """A message with the sessions folder's path left out (the page names entries, not paths)."""
    return message.replace(f"{root}{os.sep}", "")
