"""The run report's pictures: grid captions a reader can read."""

import numpy as np
from PIL import Image, ImageDraw

from gapray.report import draw_words, image_grid


def word_gaps(strip: np.ndarray, min_width: int) -> int:
    """Runs of at least `min_width` blank pixel columns between inked ones, in a strip of rendered text."""
    inked = (strip < 128).any(axis=(0, 2))
    cols = np.flatnonzero(inked)
    return int((np.diff(cols) - 1 >= min_width).sum())


def test_grid_titles_and_captions_keep_their_spaces():
    """PIL's default font draws a space 2 px wide: 'a photo of a circle' read 'a photoofa circle'. Every space is
    now a gap wider than any between two letters of a word."""
    title = "single_object: a photo of a circle"
    grid = np.asarray(image_grid(np.zeros((2, 32, 32, 3), np.uint8), ["self 1 p=0.90"] * 2, [(0, 0, 0)] * 2, 2, title))
    assert word_gaps(grid[2:16], 4) == title.count(" ")
    strip = Image.new("RGB", (200, 16), "white")
    draw_words(ImageDraw.Draw(strip), (2, 2), "aphotoofacircle", fill=(0, 0, 0))
    assert word_gaps(np.asarray(strip), 4) == 0  # no gap that wide inside a word
