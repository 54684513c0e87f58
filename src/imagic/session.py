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

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file, save_file

from .backends.base import Delta, TextCond
from .errors import ImagicError, SessionError
from .presets import EditConfig

FORMAT_VERSION = 1
# The keys of a backend's `identity` that must match for a session to be applied to it; the
# others (where the model was loaded from) are informative only.
IDENTITY_KEYS = ("family", "fingerprint")


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

    def check_model(self, backend) -> None:
        """Refuse to apply this session to a base model other than the one it was trained on."""
        if not model_identity_matches(self.model, backend.identity):
            raise SessionError(
                f"this session was made with {self.model.get('source', '?')} "
                f"({self.model.get('family', '?')}); the loaded model "
                f"{backend.identity.get('source', '?')} is a different one: load that model instead"
            )

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
        """Write the folder under a temporary name, then rename it into place (replacing an
        earlier session there), so an interrupted save never leaves a half-written session."""
        path = self.check_destination(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            embeddings = {f"e_tgt.{k}": v for k, v in self.e_tgt.tensors().items()}
            embeddings |= {f"e_opt.{k}": v for k, v in self.e_opt.tensors().items()}
            save_file({k: v.contiguous().cpu() for k, v in embeddings.items()},
                      tmp / "embeddings.safetensors")
            save_file({k: v.contiguous().cpu() for k, v in self.delta.tensors.items()},
                      tmp / "delta.safetensors", metadata={"kind": self.delta.kind})
            self.input_image.save(tmp / "input.png")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=2) + "\n")
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                old.rmdir()
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
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

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditSession:
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise SessionError(f"{path} is not an imagic session (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != "imagic-session":
                raise SessionError(f"{manifest_path} is not an imagic session manifest")
            if manifest.get("format_version", 0) > FORMAT_VERSION:
                raise SessionError(
                    f"{path} was saved by a newer imagic (format {manifest['format_version']}); "
                    "upgrade imagic"
                )
            embeddings = load_file(path / "embeddings.safetensors")
            delta_tensors = load_file(path / "delta.safetensors")
            with Image.open(path / "input.png") as img:
                input_image = img.convert("RGB")
        except SessionError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise SessionError(f"{path} is damaged or incomplete: {err}") from None

        def cond(prefix: str) -> TextCond:
            return TextCond.from_tensors(
                {k.split(".", 1)[1]: v for k, v in embeddings.items() if k.startswith(prefix)}
            )

        try:
            return cls(
                text=manifest["text"],
                e_tgt=cond("e_tgt."),
                e_opt=cond("e_opt."),
                delta=Delta(
                    kind=manifest["delta"]["kind"],
                    tensors=delta_tensors,
                    lora_rank=manifest["delta"]["lora_rank"],
                ),
                config=EditConfig.from_dict(manifest["config"]),
                model=manifest["model"],
                image_sha256=manifest["input_sha256"],
                input_image=input_image,
                timings=manifest.get("timings", {}),
                # sessions of format 1 saved by early versions kept only the final losses
                losses=manifest.get("losses") or {
                    k: [v] for k, v in manifest.get("final_loss", {}).items() if v is not None},
                versions=manifest.get("versions", {}),
            )
        except ImagicError:  # a config the checks refuse: say which file
            raise SessionError(f"{manifest_path} is damaged or incomplete: its config is "
                               "not one imagic can use") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SessionError(f"{manifest_path} is damaged or incomplete "
                               f"({type(err).__name__}: {err})") from None


def _is_session(path: Path) -> bool:
    """A folder holding a session's manifest (not, say, an edit's output manifest)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == "imagic-session"
    except (OSError, ValueError, AttributeError):
        return False
