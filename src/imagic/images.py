"""Reading the user's image safely, bringing it to the model's square resolution, and the grid.

Conversions that keep the picture (palette, grayscale, 16-bit, transparency) are made with a
warning; those that would change it in ways we can't check (CMYK without colour management,
animation, floating-point pixels) are refused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import InputError

MIN_SIDE = 64
MAX_SIDE = 8192


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_image(path: str | os.PathLike, min_side: int = MIN_SIDE) -> Image.Image:
    """Open `path` as an 8-bit RGB image, or raise InputError with the reason. The size is
    read from the header and checked (each side from `min_side` to MAX_SIDE) before any pixel
    is decoded. The command line passes min_side=1 and leaves the minimum to `Imagic.fit`, which
    knows the model's resolution (`min_side()`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "a special file"
        raise InputError(f"expected an image file, got {kind}: {path}")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the check below says it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_size(img.size, name=str(path), min_side=min_side)
            img.load()
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise InputError(
                    f"{path} is animated ({frames} frames): "
                    "export the frame to edit as a still image"
                )
            image = img.copy()
    except Image.DecompressionBombError:  # a header past twice Pillow's own pixel limit
        raise InputError(f"{path} declares more pixels than imagic reads: each side must be "
                         f"at most {MAX_SIDE} px; resize it") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read") from None
    except OSError as err:
        raise InputError(f"could not read {path}: {err}") from None
    return upright_rgb(image, name=str(path))


def check_size(size: tuple[int, int], name: str = "the image", min_side: int = 1) -> None:
    """Each side between `min_side` and MAX_SIDE pixels."""
    w, h = size
    if min(w, h) < min_side:
        raise InputError(f"{name} is {w}×{h}: each side must be at least {min_side} px")
    if max(w, h) > MAX_SIDE:
        raise InputError(f"{name} is {w}×{h}: each side must be at most {MAX_SIDE} px; resize it")


def min_side(resolution: int) -> int:
    """The smallest input side for a model of `resolution` px: MIN_SIDE, or the model's own
    resolution where that is smaller (a 32×32 render for the 32×32 embedded model)."""
    return min(MIN_SIDE, resolution)


def upright_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """The image as the user sees it, in 8-bit RGB: a camera's EXIF orientation applied (phone
    portraits are stored sideways), then `to_rgb`. `Imagic.fit` calls it too, so the Python API
    reads an image as the command line does."""
    return to_rgb(ImageOps.exif_transpose(image), name=name)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB from the modes that convert safely; InputError for the others."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "CMYK":
        raise InputError(
            f"{name} is CMYK: converting without its colour profile would change its colours; "
            "export it as RGB first"
        )
    if mode in ("F", "I;32", "I;32B"):
        raise InputError(f"{name} has {mode} pixels of unknown range; export it as 8-bit RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.int64)
        if array.min() < 0 or array.max() > 65535:
            raise InputError(f"{name} has 32-bit pixels of unknown range; export it as 8-bit RGB")
        warnings.warn(f"{name} is 16-bit grayscale: reduced to 8 bits and converted to RGB",
                      stacklevel=2)
        return Image.fromarray((array / 257.0).round().astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        warnings.warn(f"{name} has transparency: flattened onto white", stacklevel=2)
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1"):
        warnings.warn(f"{name} is grayscale: converted to RGB (the edit may add colour)",
                      stacklevel=2)
        return image.convert("RGB")
    if mode in ("P", "YCbCr"):
        return image.convert("RGB")  # a lossless change of representation
    raise InputError(f"{name} has pixel mode {mode}, which imagic does not convert; "
                     "export it as RGB")


def to_square(image: Image.Image, size: int, pad: bool = False) -> Image.Image:
    """Centre-crop (default) or letterbox with black (`pad`) to a square, then resize to `size`."""
    if pad:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    else:
        image = ImageOps.fit(image, (min(image.size),) * 2, centering=(0.5, 0.5))
    side = image.width
    if side != size and side % size == 0:
        return image.reduce(side // size)  # an exact area average for whole-number factors
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def to_tensor(image: Image.Image):
    """PIL RGB → float tensor 1×3×H×W in [−1, 1], the range diffusion models use."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(batch) -> list[Image.Image]:
    """Float tensor N×3×H×W in [−1, 1] → PIL images."""
    array = ((batch.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu")
    array = array.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def make_grid(
    source: Image.Image,
    images: dict[tuple[int, float], Image.Image],
    seeds: Sequence[int],
    etas: Sequence[float],
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """The input first, then one row per seed and one column per η, with labels ("seed S"
    unless `row_labels` gives one per row).

    Small images (the 32×32 ShapesWorld model) are enlarged with nearest-neighbour so the labels
    stay legible and the pixels stay honest.
    """
    cell = source.width
    scale = max(1, 128 // cell)
    cell *= scale
    font = ImageFont.load_default(size=14)
    labels = list(row_labels) if row_labels else [f"seed {seed}" for seed in seeds]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((measure.multiline_textbbox((0, 0), t, font=font)[2] for t in labels), default=0)
    top, left, gap = 40 if title else 22, max(70, widest + 8), 4
    width = left + (len(etas) + 1) * (cell + gap)
    height = top + len(seeds) * (cell + gap)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    header_y = top - 18

    def paste(img: Image.Image, col: int, row: int) -> None:
        img = img.resize((cell, cell), Image.Resampling.NEAREST) if scale > 1 else img
        grid.paste(img, (left + col * (cell + gap), top + row * (cell + gap)))

    draw.text((left, header_y), "input", fill=(0, 0, 0), font=font)
    paste(source, 0, 0)
    for j, eta in enumerate(etas):
        draw.text((left + (j + 1) * (cell + gap), header_y), f"eta {eta:g}", fill=(0, 0, 0),
                  font=font)
    for i, seed in enumerate(seeds):
        draw.multiline_text((4, top + i * (cell + gap) + cell // 2 - 8), labels[i],
                            fill=(0, 0, 0), font=font)
        for j, eta in enumerate(etas):
            paste(images[(seed, eta)], j + 1, i)
    return grid


def save_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG under a temporary name in the same folder, then rename it into place, so a
    crash never leaves a truncated file behind."""
    _write_atomic(path, lambda f: image.save(f, format="PNG"))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """`save_atomic` for UTF-8 text."""
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _write_atomic(path: str | os.PathLike, write) -> None:
    """`write(binary file)` under a temporary name beside `path`, then rename it into place
    with the mode a plain open() gives (mkstemp's is 0600). An OSError names `path`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(err, path) from None
        raise


def write_error(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` (disk full, no permission, ...) as an OSError naming `path`: the file the user
    asked for, not the temporary one that failed."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    read it by setting it, which a thread creating a file at that moment would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file or folder the mode a plain open() or mkdir() would (0644 and 0755 under
    umask 022): mkstemp and mkdtemp make them private (0600, 0700)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())
