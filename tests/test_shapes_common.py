"""The mask and pebble tools both ShapesWorlds share (imagic.shapes.common).

Both worlds' detectors, and so the shipped model's evaluations, read their results through
these functions, so they are checked against plain reference versions and synthetic images
whose answers are known.
"""

from collections import deque

import numpy as np

from imagic.shapes import common


def _bfs_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels by a plain breadth-first search, numbered in raster order."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
    return labels, n


def _window_max(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation by brute force over every pixel's window."""
    h, w = mask.shape
    return np.array([
        [mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any() for x in range(w)]
        for y in range(h)
    ])


def test_label_components_numbers_components_like_a_breadth_first_search() -> None:
    """The same labels, numbering included: detectors pick components by label."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.75)
        labels, n = common.label_components(mask)
        ref, m = _bfs_labels(mask)
        assert n == m
        assert labels.dtype == np.int32
        assert np.array_equal(labels, ref)


def test_label_components_joins_diagonal_neighbours_and_reads_any_nonzero_as_set() -> None:
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[0, 0] = 1
    mask[1, 1] = 2  # diagonal neighbour of (0, 0)
    mask[4:6, 4:6] = 1
    labels, n = common.label_components(mask)
    assert n == 2
    assert labels[0, 0] == labels[1, 1] == 1
    assert (labels[4:6, 4:6] == 2).all()
    assert common.label_components(np.zeros((3, 5), dtype=bool))[1] == 0


def test_dilate_and_erode_use_a_3x3_window() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = rng.integers(1, 20, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        assert np.array_equal(common.dilate(mask), _window_max(mask))
        # Pixels outside the image do not count: erosion only looks at the window's inside part.
        assert np.array_equal(common.erode(mask), ~_window_max(~mask))
    assert common.erode(np.ones((3, 4), dtype=bool)).all()


def _image_with_pebbles(
    size: int, centres: list[tuple[float, float]], radius: float
) -> np.ndarray:
    """A grey gradient with dark discs at ``centres`` (x, y in px), uint8 (size, size, 3)."""
    t = common.gradient(size, 30.0)[..., None]
    img = 90.0 + 60.0 * t * np.ones(3)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    for cx, cy in centres:
        img[(xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2] = 35.0
    return np.rint(img).astype(np.uint8)


def test_find_pebbles_finds_dark_discs_on_a_gradient_and_skips_excluded_pixels() -> None:
    centres = [(12.5, 20.5), (40.5, 8.5), (50.5, 50.5)]
    image = _image_with_pebbles(64, centres, 2.5)
    params = {"dark_ratio": 0.82, "depth": 0.3, "mass": 2.0}
    found = common.find_pebbles(image, **params)
    assert common.match_pebbles(centres, found, match_px=0.1) == (3, 0)

    exclude = np.zeros((64, 64), dtype=bool)
    exclude[45:57, 45:57] = True  # hides the third pebble
    found = common.find_pebbles(image, exclude, **params)
    assert common.match_pebbles(centres, found, match_px=0.1) == (2, 0)
    # Thresholds decide what counts: a disc's summed darkness is below a huge mass.
    assert common.find_pebbles(image, dark_ratio=0.82, depth=0.3, mass=1e3) == []


def test_match_pebbles_pairs_each_pebble_once_within_the_distance() -> None:
    expected = [(10.0, 10.0), (11.0, 10.0), (30.0, 30.0)]
    found = [(10.6, 10.0), (20.0, 20.0)]
    # One found pebble cannot stand for two expected ones; (20, 20) is too far from all.
    assert common.match_pebbles(expected, found, match_px=1.5) == (1, 1)
    assert common.match_pebbles(expected, found, match_px=0.3) == (0, 2)
    assert common.match_pebbles([], found, match_px=1.5) == (0, 2)
