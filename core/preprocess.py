"""Image preprocessing: the one implementation of decode → resize → normalise, described by `preprocess.json`.

Training (eval transform and the base of its augmentations), the exporter's parity check, the index builder and
the service all call these functions, so an image is turned into the same tensor everywhere.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Decoded-pixel ceiling: refuses decompression bombs before Pillow allocates them.
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# squash: both sides to the input size (SigLIP). shortest_center_crop: the largest centred square, then resized.
# resize_center_crop: shorter side to `resize_size`, then the centred input-size square (transformers'
# CLIPImageProcessor and torchvision's Resize + CenterCrop, which OpenAI CLIP and OpenCLIP use). longest_pad: the
# whole image, padded to a square with the background colour (our trained models).
RESIZE_MODES = ("squash", "shortest_center_crop", "resize_center_crop", "longest_pad")
# An image whose shorter side is at least this many times the input size is first box-reduced by an integer
# factor (Pillow's `reduce`) and then resized: Pillow's own `reducing_gap` guidance, close to resizing the full
# image for photos, though not equal (up to 0.1 in normalised units on high-frequency content). Reduction is
# idempotent, so a caller may reduce early to free memory (the service does, right after decoding) and `resize`
# gives the same input either way. Imported checkpoints set `reducing_gap` to None: their input must equal their
# reference processor's, which resizes the full image.
REDUCING_GAP = 3


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode (corrupt, truncated, unsupported or too large)."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What `preprocess.json` holds: everything needed to turn an image into the encoder's input."""

    image_size: int = 64
    resize_mode: str = "longest_pad"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited onto this colour
    interpolation: str = "bicubic"
    resize_size: int | None = None  # resize_center_crop: the shorter side before the crop (None: image_size)
    reducing_gap: int | None = REDUCING_GAP  # None: always resize the full decoded image (exact, slower)

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size must be >= image_size ({self.image_size}), got {self.resize_size}")
        if self.reducing_gap is not None and self.reducing_gap < 2:
            raise ValueError(f"reducing_gap must be >= 2 or null, got {self.reducing_gap}")
        if self.interpolation.upper() not in Image.Resampling.__members__:
            raise ValueError(f"interpolation must be a Pillow resampling filter, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_image(source: bytes | str | Path | Image.Image,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode bytes, a file or an opened (lazy) Pillow image into RGB, compositing transparency onto `background`."""
    return to_rgb(open_image(source), background)


def open_image(source: bytes | str | Path | Image.Image) -> Image.Image:
    """Decode bytes, a file or an opened (lazy) Pillow image, upright (EXIF orientation), in its own mode."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            image = Image.open(source)
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from err


def reduce_for(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The image box-reduced by the largest integer factor that keeps its shorter side ≥ the config's reducing gap
    × the input size (unchanged when that factor is 1 or the config has no reducing gap); idempotent."""
    if config.reducing_gap is None:
        return image
    factor = min(image.size) // (config.reducing_gap * config.image_size)
    return image.reduce(factor) if factor >= 2 else image


def decode_for_model(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Decode an opened (lazy) image no larger than the model needs: JPEG at a reduced DCT scale (`draft`) that
    keeps both sides ≥ the reducing gap × the input size, then `reduce_for`; the peak is the decoded size, held
    once. Without a reducing gap the image is decoded whole."""
    return reduce_for(to_rgb(_draft_open(image, config), config.background), config)


def decode_with_alpha(image: Image.Image, config: PreprocessConfig) -> tuple[Image.Image, Image.Image]:
    """`decode_for_model`'s RGB image and its opacity (`alpha_channel`), reduced alike (training's background
    augmentation)."""
    decoded = _draft_open(image, config)
    return (reduce_for(to_rgb(decoded, config.background), config),
            reduce_for(alpha_channel(decoded), config))


def _draft_open(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The opened image decoded, a JPEG at the smallest DCT scale `decode_for_model` allows."""
    if config.reducing_gap is not None:
        target = config.reducing_gap * config.image_size
        if image.format == "JPEG" and min(image.size) >= 2 * target:
            image.draft("RGB", (target, target))
    return open_image(image)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB view of any Pillow image; transparent pixels become `background`."""
    rgba = _transparent_rgba(image)
    if rgba is None:
        return image.convert("RGB")
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def alpha_channel(image: Image.Image) -> Image.Image:
    """The opacity `to_rgb` composites with, as an "L" image: 255 everywhere for an image without transparency."""
    rgba = _transparent_rgba(image)
    return Image.new("L", image.size, 255) if rgba is None else rgba.getchannel("A")


def _transparent_rgba(image: Image.Image) -> Image.Image | None:
    """The image in RGBA when its mode carries transparency, else None."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return None


def resize(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Resize an RGB image to the square encoder input; (H, W, 3) uint8."""
    image = reduce_for(to_rgb(image, config.background), config)
    return np.asarray(_fit(image, config, config.background), dtype=np.uint8)


def resize_alpha(alpha: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An "L" opacity (`alpha_channel`) through `resize`'s geometry, transparent where `resize` pads; (H, W)
    uint8."""
    return np.asarray(_fit(reduce_for(alpha, config), config, 0), dtype=np.uint8)


def _fit(image: Image.Image, config: PreprocessConfig, fill: tuple[int, int, int] | int) -> Image.Image:
    """The config's resize mode at its input size; `longest_pad` pads with `fill`."""
    size = config.image_size
    method = Image.Resampling[config.interpolation.upper()]
    if config.resize_mode == "squash":
        return image.resize((size, size), method)
    if config.resize_mode == "shortest_center_crop":
        return ImageOps.fit(image, (size, size), method=method)
    if config.resize_mode == "resize_center_crop":
        return _center_crop(image.resize(_shorter_side_to(image.size, config.resize_size or size), method), size)
    return ImageOps.pad(image, (size, size), method=method, color=fill)  # longest_pad: the whole image visible


def _shorter_side_to(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(width, height) with the shorter side `short` and the longer one scaled and truncated, as transformers and
    torchvision compute it."""
    width, height = size
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred `size` square, its offsets rounded down (transformers' `center_crop`)."""
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (..., H, W, 3) → float32 (..., 3, H, W) scaled by the config's mean and std."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """The eval transform: (3, H, W) float32."""
    return normalize(resize(image, config), config)


def preprocess_batch(images: list[Image.Image], config: PreprocessConfig) -> np.ndarray:
    """The eval transform over a list: (B, 3, H, W) float32."""
    if not images:
        return np.zeros((0, 3, config.image_size, config.image_size), np.float32)
    return normalize(np.stack([resize(im, config) for im in images]), config)
