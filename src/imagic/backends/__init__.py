"""Model families. `load_backend` picks the family from what the user named."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from ..errors import InputError, ModelError
from .base import Backend, Delta, TextCond

__all__ = ["Backend", "Delta", "TextCond", "load_backend", "resolve_device", "resolve_dtype"]


class _EmptyFloat32ListFilter(logging.Filter):
    """diffusers warns on every dtype cast that a model has modules "that should be kept in
    float32: []", even where that list is empty; drop that line only, keep every real one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFloat32ListFilter())

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):  # mps, xpu, …: not what imagic is built for
        raise InputError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but this machine has no CUDA GPU")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return resolved


def device_name(device: torch.device) -> str:
    """The device as a record names it: the GPU's model, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The precision of frozen parts and autocast. auto: bf16 on CUDA, fp32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    if device.type != "cuda" and DTYPES[dtype] != torch.float32:
        # the backends run everything in float32 off CUDA: refuse rather than ignore the request
        raise InputError(f"--dtype {dtype} needs a CUDA GPU; on {device.type} imagic runs "
                         f"float32 (--dtype auto or float32)")
    return DTYPES[dtype]


def load_backend(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    config: str | None = None,
    revision: str | None = None,
) -> Backend:
    """Load a model: None for the embedded default (ShapesWorld, "imagic:shapes-32"), a name of
    EMBEDDED_MODELS for a model shipped in the package ("imagic:shapes2-128": the ShapesWorld 2
    cascade), as sessions record them; else an imagic model folder, a Stable Diffusion hub id,
    diffusers folder or .safetensors file.

    `config` is the diffusers folder whose configs describe a single-file checkpoint; offline, a
    single file needs it.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    from .cascade import EMBEDDED_MODELS, EMBEDDED_SOURCE, is_pixel_model, load_pixel_model

    model = EMBEDDED_SOURCE if model is None else model
    if model in EMBEDDED_MODELS:  # a ShapesWorld model shipped in the package
        if not is_pixel_model(EMBEDDED_MODELS[model]):
            raise ModelError(f"the embedded model {model} is missing from this install; "
                             "reinstall imagic or pass --model")
        return load_pixel_model(EMBEDDED_MODELS[model], torch_device, torch_dtype, source=model)
    if Path(model).is_dir() and is_pixel_model(Path(model)):
        return load_pixel_model(model, torch_device, torch_dtype)
    from .deepfloyd_if import is_deepfloyd_if, load_deepfloyd_if

    if is_deepfloyd_if(model):  # "IF_I+IF_II", an IF folder, or a DeepFloyd/IF-… hub id
        return load_deepfloyd_if(model, torch_device, torch_dtype, allow_pickle, config, revision)
    if config is not None and not Path(config).is_dir():
        raise InputError(f"--config must be a diffusers model folder: {config}")
    from .flow import flow_family

    family = flow_family(model, config, revision)  # SD3 or FLUX, by model_index.json
    if family == "sd3":
        from .sd3 import load_sd3

        return load_sd3(model, torch_device, torch_dtype, allow_pickle, config, revision)
    if family == "flux":
        from .flux import load_flux

        return load_flux(model, torch_device, torch_dtype, allow_pickle, config, revision)
    from .sdxl import is_sdxl, load_sdxl

    if is_sdxl(model, config, revision):  # by model_index.json (a single file: its tensors)
        return load_sdxl(model, torch_device, torch_dtype, allow_pickle, config, revision)
    from .stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(model, torch_device, torch_dtype, allow_pickle, config, revision)


PHOTO_FAMILIES = ("stable-diffusion", "sdxl", "sd3", "flux", "deepfloyd-if")


def require_family(backend, family: str | tuple[str, ...], what: str) -> None:
    """One line when a command that needs one family of model (or one of several) is given
    another."""
    families = (family,) if isinstance(family, str) else family
    if backend.family not in families:
        named = " or ".join(families) if len(families) < 3 else (
            ", ".join(families[:-1]) + " or " + families[-1])
        raise InputError(f"{what} needs a {named} model; "
                         f"{backend.identity.get('source', 'this one')} is {backend.family}")
