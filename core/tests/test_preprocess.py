"""Decoding no larger than the model needs: early reduction gives the model the same input as decoding in full."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.preprocess import (
    REDUCING_GAP,
    PreprocessConfig,
    decode_for_model,
    load_image,
    normalize,
    preprocess_image,
    reduce_for,
)


def photo(width: int, height: int, fmt: str) -> Image.Image:
    """A smooth, non-trivial picture, encoded as `fmt` and opened lazily (header only)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, fmt)
    buf.seek(0)
    return Image.open(buf)


@pytest.mark.parametrize("mode", ["squash", "shortest_center_crop", "longest_pad"])
@pytest.mark.parametrize("size", [(1200, 900), (900, 1200), (500, 97)])
def test_early_reduction_gives_the_model_the_same_input_as_a_full_decode(mode, size):
    config = PreprocessConfig(image_size=32, resize_mode=mode)
    full = preprocess_image(load_image(photo(*size, "PNG")), config)
    early = decode_for_model(photo(*size, "PNG"), config)
    assert min(early.size) >= REDUCING_GAP * config.image_size or early.size == size
    np.testing.assert_array_equal(preprocess_image(early, config), full)


def test_a_large_jpeg_is_decoded_small_and_stays_close_to_a_full_decode():
    config = PreprocessConfig(image_size=32, resize_mode="shortest_center_crop")
    early = decode_for_model(photo(2400, 1800, "JPEG"), config)
    assert early.size[0] * early.size[1] < 2400 * 1800 / 16  # DCT scaling and reduction, not the full picture
    full = preprocess_image(load_image(photo(2400, 1800, "JPEG")), config)
    assert np.abs(preprocess_image(early, config) - full).max() < 0.1  # in normalised units (std 0.5)


def test_reduction_is_idempotent_and_keeps_small_images_as_they_are():
    image, config = Image.new("RGB", (1000, 700)), PreprocessConfig(image_size=32)
    once = reduce_for(image, config)
    assert reduce_for(once, config).size == once.size and min(once.size) >= REDUCING_GAP * 32
    small = Image.new("RGB", (150, 90))
    assert reduce_for(small, config) is small


def test_without_a_reducing_gap_the_full_image_is_decoded_and_resized():
    config = PreprocessConfig(image_size=32, resize_mode="squash", reducing_gap=None)
    early = decode_for_model(photo(2400, 1800, "JPEG"), config)
    assert early.size == (2400, 1800)
    full = load_image(photo(2400, 1800, "JPEG")).resize((32, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(preprocess_image(early, config), normalize(np.asarray(full), config))
