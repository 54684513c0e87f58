"""imagic: edit one real image to match a text, by Imagic (Kawar et al., CVPR 2023)."""

__version__ = "0.1.0"

from .backends import load_backend  # noqa: E402
from .editor import EditImage, Imagic, finetune, generate, interpolate, optimize_embedding  # noqa: E402
from .errors import ImagicError, InputError, ModelError, SessionError  # noqa: E402
from .presets import PRESETS, EditConfig, get_preset  # noqa: E402
from .session import EditSession  # noqa: E402

__all__ = [
    "EditConfig",
    "EditImage",
    "EditSession",
    "Imagic",
    "ImagicError",
    "InputError",
    "ModelError",
    "PRESETS",
    "SessionError",
    "finetune",
    "generate",
    "get_preset",
    "interpolate",
    "load_backend",
    "optimize_embedding",
]
