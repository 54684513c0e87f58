"""EditSession: everything stages 1–2 produced, saved to a folder that re-renders without training.

Layout of a session folder:

    manifest.json           text, config, base model identity, input sha256, timings, versions
    embeddings.safetensors  e_tgt.* and e_opt.* (the TextCond tensors)
    delta.safetensors       the trained weights: a LoRA adapter, or the tensors training changed
    input.png               the input as the model saw it (square, at the model's resolution)

Applying a session never changes the base model: the backend swaps the delta in for the
duration of sampling only.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .backends.base import Delta, TextCond
from .errors import ImagicError, SessionError
from .images import follow_umask, load_image, write_error
from .presets import EditConfig

FORMAT_VERSION = 1
# The keys of a backend's `identity` that must match for a session to be applied to it; the
# others (where the model was loaded from) are informative only.
IDENTITY_KEYS = ("family", "fingerprint")
FILES = ("manifest.json", "embeddings.safetensors", "delta.safetensors", "input.png")
DELTA_KINDS = ("full", "lora")
COND_NAMES = tuple(f.name for f in fields(TextCond))  # hidden_states, pooled


def library_versions() -> dict[str, str]:
    import diffusers
    import peft
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "imagic": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def model_identity_matches(saved: dict, current: dict) -> bool:
    return all(saved.get(k) == current.get(k) for k in IDENTITY_KEYS)


@dataclass
class EditSession:
    text: str  # the target text
    e_tgt: TextCond  # its embedding
    e_opt: TextCond  # stage 1's result
    delta: Delta  # stage 2's result
    config: EditConfig  # the config that made it (stage 3 defaults come from it too)
    model: dict  # the base model's identity (Backend.identity)
    image_sha256: str  # of the input file (or of its pixels when given as an image)
    input_image: Image.Image  # the input at the model's resolution, for grids
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    folder: Path | None = field(default=None, compare=False)  # where `load` read it from

    def check_model(self, backend) -> None:
        """Refuse to apply this session to a base model other than the one it was trained on,
        or one its tensors do not fit exactly: the embeddings as `encode_text` makes them, the
        delta's names and shapes as `delta_shapes` gives them, the input at the model's
        resolution. Nothing is broadcast; one SessionError naming the file."""
        if not model_identity_matches(self.model, backend.identity):
            raise SessionError(
                f"this session was made with {self.model.get('source', '?')} "
                f"({self.model.get('family', '?')}); the loaded model "
                f"{backend.identity.get('source', '?')} is a different one: load that model instead"
            )

        def unfit(name: str, what: str) -> SessionError:
            where = self.folder / name if self.folder else f"the session's {name}"
            return SessionError(f"{where} does not fit the loaded model: {what}")

        expected = backend.encode_text([""]).tensors()  # one text: batch 1, tokens, width
        for side, cond in (("e_tgt", self.e_tgt), ("e_opt", self.e_opt)):
            tensors = cond.tensors()
            if tensors.keys() != expected.keys():
                raise unfit("embeddings.safetensors", f"{side} holds {', '.join(tensors)}; "
                            f"the model's text encoder gives {', '.join(expected)}")
            for name, value in tensors.items():
                want = expected[name]
                if value.shape != want.shape:
                    raise unfit("embeddings.safetensors", f"{side}.{name} has shape "
                                f"{list(value.shape)}; the model's is {list(want.shape)}")
                if value.dtype != want.dtype:
                    raise unfit("embeddings.safetensors", f"{side}.{name} is {value.dtype}; "
                                f"the model's is {want.dtype}")
        delta = self.delta
        shapes = backend.delta_shapes(delta.kind, delta.lora_rank)
        model = "the model" if delta.kind == "full" else f"a rank-{delta.lora_rank} adapter"
        for name, value in delta.tensors.items():
            if name not in shapes:
                raise unfit("delta.safetensors", f"{name} is not a tensor of {model}")
            if tuple(value.shape) != shapes[name]:
                raise unfit("delta.safetensors", f"{name} has shape {list(value.shape)}; "
                            f"{model}'s is {list(shapes[name])}")
        missing = [name for name in shapes if name not in delta.tensors]
        if delta.kind == "lora" and missing:  # an adapter is applied whole
            raise unfit("delta.safetensors", f"{missing[0]} of {model} is missing "
                        f"({len(missing)} of {len(shapes)} tensors missing)")
        side = backend.output_resolution
        if self.input_image.size != (side, side):
            width, height = self.input_image.size
            raise unfit("input.png", f"it is {width}×{height}; the model's images are "
                        f"{side}×{side}")

    def manifest(self) -> dict:
        return {
            "format": "imagic-session",
            "format_version": FORMAT_VERSION,
            "text": self.text,
            "model": self.model,
            "input_sha256": self.image_sha256,
            "config": self.config.to_dict(),
            "delta": {
                "kind": self.delta.kind,
                "lora_rank": self.delta.lora_rank,
                "tensors": len(self.delta.tensors),
                "parameters": self.delta.num_elements(),
            },
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "final_loss": {k: (v[-1] if v else None) for k, v in self.losses.items()},
            "losses": {k: [round(x, 6) for x in v] for k, v in self.losses.items()},
            "versions": self.versions,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder under a temporary name beside `path`, then rename it into place
        (replacing an earlier session there, which stays whole until the new one is), so an
        interrupted or failed save never leaves a half-written session. Files and folder get
        the modes the umask gives. A failure (a full disk, no permission) is an OSError naming
        `path`, and leaves nothing behind, even when another save of the same path ran at the
        same time (the command line also locks the path, so its saves never meet)."""
        path = self.check_destination(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        except OSError as err:
            raise write_error(err, path) from None
        try:
            embeddings = {f"e_tgt.{k}": v for k, v in self.e_tgt.tensors().items()}
            embeddings |= {f"e_opt.{k}": v for k, v in self.e_opt.tensors().items()}
            save_file({k: v.contiguous().cpu() for k, v in embeddings.items()},
                      tmp / "embeddings.safetensors")
            save_file({k: v.contiguous().cpu() for k, v in self.delta.tensors.items()},
                      tmp / "delta.safetensors", metadata={"kind": self.delta.kind})
            self.input_image.save(tmp / "input.png")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=2) + "\n")
            for file in (tmp, *tmp.iterdir()):
                follow_umask(file)
            _replace_folder(tmp, path)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, SafetensorError):  # its I/O errors, e.g. "... (os error 28)"
                found = re.search(r"os error (\d+)", str(err))
                err = (OSError(int(found[1]), os.strerror(int(found[1]))) if found
                       else OSError(errno.EIO, " ".join(str(err).split())))
            if isinstance(err, OSError):
                raise write_error(err, path) from None
            raise
        return path

    @staticmethod
    def check_destination(path: str | os.PathLike) -> Path:
        """A session may be saved at `path`: a new folder, an empty one, or an earlier session
        (which it replaces); never a file or a folder of something else."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SessionError(f"{path} is a file; choose a folder for the session")
        if path.is_dir() and any(path.iterdir()) and not _is_session(path):
            raise SessionError(
                f"{path} is a non-empty folder that is not a session; choose another"
            )
        return path

    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict:
        """A session folder's manifest, read and checked as `load` checks it, without loading
        its tensors (to list sessions cheaply). A problem is one SessionError naming the file."""
        return _manifest_and_config(Path(path))[0]

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditSession:
        """Read a session folder, checking everything that needs no model: each file is a
        regular file inside the folder, the manifest's fields have their types, the tensors
        load, are floating point and finite and pair up, the input is a square RGB image.
        `check_model` checks the rest against the loaded model. A problem is one SessionError
        naming the file."""
        folder = Path(path)
        manifest, config = _manifest_and_config(folder)
        files = {name: _regular_file(folder, name) for name in FILES[1:]}
        e_tgt, e_opt = _read_embeddings(files["embeddings.safetensors"],
                                        folder / "embeddings.safetensors")
        delta = _read_delta(files["delta.safetensors"], folder / "delta.safetensors",
                            manifest["delta"])
        input_image = _read_input(files["input.png"], folder / "input.png")
        return cls(
            text=manifest["text"],
            e_tgt=e_tgt,
            e_opt=e_opt,
            delta=delta,
            config=config,
            model=manifest["model"],
            image_sha256=manifest["input_sha256"],
            input_image=input_image,
            timings=manifest.get("timings", {}),
            # sessions of format 1 saved by early versions kept only the final losses
            losses=manifest.get("losses") or {
                k: [v] for k, v in manifest.get("final_loss", {}).items() if v is not None},
            versions=manifest.get("versions", {}),
            folder=folder,
        )


def _is_session(path: Path) -> bool:
    """A folder holding a session's manifest (not, say, an edit's output manifest). Only a
    regular file is read: a FIFO in its place would block."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == "imagic-session"
    except (OSError, ValueError, AttributeError):
        return False


def _replace_folder(tmp: Path, path: Path) -> None:
    """Rename the complete folder `tmp` to `path`. An earlier folder there is moved aside
    first and removed after, or put back if the rename fails: no copy is ever orphaned."""
    if not path.exists():
        tmp.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if not os.path.lexists(path):  # nothing took its place: the earlier one goes back
            old.rename(path)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- loading checks


def _damaged(file: Path, what: str) -> SessionError:
    return SessionError(f"{file} is damaged or incomplete: {what}")


def _regular_file(folder: Path, name: str) -> Path:
    """The session's file `name` with links resolved: it must be a regular file inside the
    folder. Checked with stat before anything opens it, so a FIFO or a device never blocks."""
    shown = folder / name
    try:
        target = shown.resolve(strict=True)
        inside = target.is_relative_to(folder.resolve(strict=True))
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise SessionError(f"{shown} is missing: the session is incomplete") from None
    except (OSError, RuntimeError) as err:  # a link loop, no permission, ...
        raise SessionError(f"{shown} cannot be read ({err})") from None
    if not inside:
        raise SessionError(f"{shown} points outside the session folder (to {target}); "
                           "a session's files must lie inside it")
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise SessionError(f"{shown} is {kind}, not a regular file")
    return target


def _read_manifest(target: Path, shown: Path) -> dict:
    try:
        manifest = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not UTF-8 or not JSON
        raise _damaged(shown, f"not readable JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _damaged(shown, f"expected a JSON object, got {_json_type(manifest)}")
    if manifest.get("format") != "imagic-session":
        raise SessionError(f"{shown} is not an imagic session manifest")
    version = manifest.get("format_version", 0)
    if not _is_int(version):
        raise _damaged(shown, f"format_version must be a whole number, got {_json_type(version)}")
    if version > FORMAT_VERSION:
        raise SessionError(f"{shown.parent} was saved by a newer imagic (format {version}); "
                           "upgrade imagic")
    return manifest


def _manifest_and_config(folder: Path) -> tuple[dict, EditConfig]:
    """A session folder's manifest, read and checked, and the config it records."""
    if not os.path.lexists(folder / "manifest.json"):
        raise SessionError(f"{folder} is not an imagic session (no manifest.json)")
    manifest_file = folder / "manifest.json"
    manifest = _read_manifest(_regular_file(folder, "manifest.json"), manifest_file)
    return manifest, _check_manifest(manifest, manifest_file)


def _check_manifest(manifest: dict, shown: Path) -> EditConfig:
    """The manifest's fields have the types `load` and `imagic generate` use; returns its
    config, checked as every EditConfig is."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _damaged(shown, what)

    for key in ("text", "model", "input_sha256", "config", "delta"):
        need(key in manifest, f"it has no {key!r} field")
    text, model, config, delta = (manifest[k] for k in ("text", "model", "config", "delta"))
    need(isinstance(text, str) and text.strip() != "",
         f"text must be a non-empty string, got {_json_type(text)}")
    need(isinstance(manifest["input_sha256"], str), "input_sha256 must be a string")
    need(isinstance(model, dict), f"model must be an object, got {_json_type(model)}")
    for key in IDENTITY_KEYS:
        need(isinstance(model.get(key), str), f"model.{key} must be a string")
    for key in ("source", "config", "revision"):  # where `imagic generate` loads the model
        need(model.get(key) is None or isinstance(model[key], str),
             f"model.{key} must be a string or null")

    need(isinstance(delta, dict), f"delta must be an object, got {_json_type(delta)}")
    kind, rank = delta.get("kind"), delta.get("lora_rank", 0)
    need(kind in DELTA_KINDS, f"delta.kind must be 'full' or 'lora', got {kind!r:.40}")
    need(_is_int(rank) and rank >= (1 if kind == "lora" else 0),
         f"delta.lora_rank must be a whole number, at least 1 for a LoRA delta, got {rank!r:.40}")
    for key in ("tensors", "parameters"):
        need(delta.get(key) is None or _is_int(delta[key]) and delta[key] >= 0,
             f"delta.{key} must be a whole number")

    need(isinstance(config, dict), f"config must be an object, got {_json_type(config)}")
    for key in ("etas", "seeds"):
        need(key not in config or isinstance(config[key], list),
             f"config.{key} must be a list, got {_json_type(config.get(key))}")
    try:
        edit_config = EditConfig.from_dict(config)
    except (ImagicError, TypeError, ValueError) as err:  # the config's own checks, in one line
        raise _damaged(shown, f"config: {err}") from None
    need(edit_config.finetune == kind,
         f"delta.kind is {kind!r} but config.finetune is {edit_config.finetune!r}")
    need(kind != "lora" or edit_config.lora_rank == rank,
         f"delta.lora_rank is {rank} but config.lora_rank is {edit_config.lora_rank}")

    timings, losses = manifest.get("timings", {}), manifest.get("losses", {})
    final_loss, versions = manifest.get("final_loss", {}), manifest.get("versions", {})
    need(isinstance(timings, dict) and all(_is_number(v) and math.isfinite(v)
                                           for v in timings.values()),
         "timings must map names to finite numbers")
    need(isinstance(losses, dict) and all(isinstance(v, list) and all(map(_is_number, v))
                                          for v in losses.values()),
         "losses must map names to lists of numbers")
    need(isinstance(final_loss, dict) and all(v is None or _is_number(v)
                                              for v in final_loss.values()),
         "final_loss must map names to numbers or null")
    need(isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values()),
         "versions must map names to strings")
    return edit_config


def _read_tensors(target: Path, shown: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a safetensors file; each floating point and finite."""
    try:
        with safe_open(target, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors' SafetensorError (truncated, empty, bad header), ...
        raise _damaged(shown, _one_line(err)) from None
    for name, value in tensors.items():
        if not value.is_floating_point():
            raise _damaged(shown, f"{name} is {value.dtype}, not floating point")
        if not torch.isfinite(value).all():
            raise _damaged(shown, f"{name} holds NaN or infinite values")
    return tensors, metadata


def _read_embeddings(target: Path, shown: Path) -> tuple[TextCond, TextCond]:
    """e_tgt and e_opt: the same TextCond tensors, of the same shapes, on both sides."""
    tensors, _ = _read_tensors(target, shown)
    sides: dict[str, dict[str, torch.Tensor]] = {"e_tgt": {}, "e_opt": {}}
    for key, value in tensors.items():
        side, _, name = key.partition(".")
        if side not in sides or name not in COND_NAMES:
            raise _damaged(shown, f"unexpected tensor {key!r:.60}")
        sides[side][name] = value
    e_tgt, e_opt = sides["e_tgt"], sides["e_opt"]
    for side, cond in sides.items():
        if "hidden_states" not in cond:
            raise _damaged(shown, f"{side}.hidden_states is missing")
    if e_tgt.keys() != e_opt.keys():
        raise _damaged(shown, "e_tgt and e_opt hold different tensors")
    for name in e_tgt:
        if e_tgt[name].shape != e_opt[name].shape:
            raise _damaged(shown, f"e_tgt.{name} has shape {list(e_tgt[name].shape)} but "
                           f"e_opt.{name} has {list(e_opt[name].shape)}")
    return TextCond.from_tensors(e_tgt), TextCond.from_tensors(e_opt)


def _read_delta(target: Path, shown: Path, manifest_delta: dict) -> Delta:
    tensors, metadata = _read_tensors(target, shown)
    kind = manifest_delta["kind"]
    if metadata.get("kind", kind) != kind:
        raise _damaged(shown, f"it holds a {metadata['kind']!r:.20} delta; manifest.json says "
                       f"{kind!r}")
    counts = {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}
    for key, count in counts.items():
        if manifest_delta.get(key, count) != count:
            raise _damaged(shown, f"it holds {count} {key}; manifest.json says "
                           f"{manifest_delta[key]}")
    return Delta(kind=kind, tensors=tensors, lora_rank=manifest_delta.get("lora_rank", 0))


def _read_input(target: Path, shown: Path) -> Image.Image:
    """The input as `imagic edit` reads an image (any size: it is the model's), square."""
    try:
        image = load_image(target, min_side=1)
    except ImagicError as err:  # its message names the file
        raise SessionError(str(err)) from None
    if image.width != image.height:
        raise _damaged(shown, f"the input is {image.width}×{image.height}, not square")
    return image


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."
