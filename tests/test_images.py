"""Reading the user's image: safe conversions are made with a warning, unsafe ones refused."""

import numpy as np
import pytest
from PIL import Image

from imagic.errors import InputError
from imagic.images import load_image, make_grid, to_square


def save(tmp_path, image, name="in.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgb_loads_unchanged(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), np.uint8))
    loaded = load_image(save(tmp_path, image))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_safe_modes_convert_to_rgb(tmp_path, mode):
    image = Image.new("RGB", (80, 80), (200, 30, 30)).convert(mode)
    if mode in ("L", "RGBA", "LA"):
        with pytest.warns(UserWarning):
            loaded = load_image(save(tmp_path, image))
    else:
        loaded = load_image(save(tmp_path, image))
    assert loaded.mode == "RGB" and loaded.size == (80, 80)


def test_camera_orientation_is_applied(tmp_path):
    # a phone portrait: pixels stored landscape, EXIF orientation 6 (rotate 90° clockwise)
    stored = np.zeros((80, 120, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(save(tmp_path, Image.fromarray(stored), "photo.jpg", exif=exif,
                             quality=95))
    assert loaded.size == (80, 120)  # shown upright: portrait
    pixels = np.asarray(loaded).mean(axis=2)
    assert pixels[:10].mean() > 200 and pixels[-10:].mean() < 50  # the band is now on top


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    array = np.full((80, 80), 65535, np.uint16)
    array[:, :40] = 32896  # mid gray in 16 bits = 128 in 8 bits
    with pytest.warns(UserWarning, match="16-bit"):
        loaded = np.asarray(load_image(save(tmp_path, Image.fromarray(array))))
    assert loaded[0, 0, 0] == 128 and loaded[0, 79, 0] == 255


def test_transparency_is_flattened_onto_white(tmp_path):
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    with pytest.warns(UserWarning, match="transparency"):
        loaded = load_image(save(tmp_path, image))
    assert loaded.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("hello"), "not an image"),
        (lambda p: Image.new("CMYK", (80, 80)).save(p, format="JPEG"), "CMYK"),
        (lambda p: Image.new("RGB", (63, 200)).save(p, format="PNG"), "at least 64"),
        (lambda p: Image.new("L", (8193, 64)).save(p, format="PNG"), "at most 8192"),
        (lambda p: Image.new("F", (80, 80)).save(p, format="TIFF"), "unknown range"),
    ],
)
def test_unsafe_or_unusable_images_are_refused(tmp_path, make, message):
    path = tmp_path / "bad.img"
    make(path)
    with pytest.raises(InputError, match=message):
        load_image(path)


def test_animated_images_are_refused(tmp_path):
    frames = [Image.new("RGB", (80, 80), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="animated"):
        load_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)


def test_non_square_is_centre_cropped_or_letterboxed():
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # a red band on the left quarter
    cropped = to_square(image, 64)
    assert cropped.size == (64, 64) and cropped.getpixel((0, 32)) == (0, 0, 255)  # band cut off
    padded = to_square(image, 64, pad=True)
    assert padded.size == (64, 64)
    assert padded.getpixel((32, 2)) == (0, 0, 0)  # black letterbox above
    assert padded.getpixel((1, 32))[0] > 200  # the red band is kept


def test_grid_puts_the_input_first_then_seeds_by_etas():
    source = Image.new("RGB", (32, 32), (255, 0, 0))
    images = {(s, e): Image.new("RGB", (32, 32), (0, 40 * s, int(200 * e)))
              for s in (0, 1) for e in (0.5, 1.0)}
    grid = make_grid(source, images, seeds=[0, 1], etas=[0.5, 1.0], title="a test")
    cell, gap, left, top = 128, 4, 70, 40
    assert grid.size == (left + 3 * (cell + gap), top + 2 * (cell + gap))
    assert grid.getpixel((left + 10, top + 10)) == (255, 0, 0)
    assert grid.getpixel((left + 2 * (cell + gap) + 10, top + cell + gap + 10)) == (0, 40, 200)
