"""Training augmentations: their config, and the style transforms, which change how a picture is drawn (background,
outlines, edges, colours, posterisation, blur) but not what it shows.

The transforms are pure, batched torch functions of (B, 3, H, W) pixels in [0, 1]. Every random choice is drawn
for the whole global batch from (seed, step), and a process takes its rows' draws, so a row's style depends on
neither the number of processes nor the data mode, and a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from core.preprocess import PreprocessConfig

PROBABILITIES = ("background_prob", "outline_prob", "edges_prob", "jitter_prob", "grayscale_prob", "posterize_prob",
                 "blur_prob")
# --style-augment: starting values of the `augment` keys, which a key given in --config overrides. Colour carries
# meaning for some emoji (a red or a blue heart, a green apple), so hue turns stay small and grayscale rare.
STYLE_PRESETS: dict[str, dict] = {
    "none": {},
    "light": {"background_prob": 0.3, "outline_prob": 0.1, "jitter_prob": 0.5, "brightness": 0.2, "contrast": 0.2,
              "saturation": 0.2, "hue": 0.02, "grayscale_prob": 0.05, "posterize_prob": 0.2,
              "posterize_bits": (3, 6), "blur_prob": 0.2, "blur_sigma": (0.3, 1.0)},
    "strong": {"background_prob": 0.5, "outline_prob": 0.2, "edges_prob": 0.1, "jitter_prob": 0.8,
               "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.05, "grayscale_prob": 0.1,
               "posterize_prob": 0.3, "posterize_bits": (2, 5), "blur_prob": 0.3, "blur_sigma": (0.3, 1.5)},
}
_STYLE_SEEDS = 0x57_1E  # namespace of the style draws' seeds, apart from every other draw of a step
# per row: [0] background, [1:4] its colour, [4] outline, [5] edges, [6] jitter, [7:11] its factors, [11] grayscale,
# [12] posterise, [13] its bits, [14] blur, [15] its sigma. Fixed columns: turning one transform on or off leaves
# the others' draws as they were.
_DRAWS = 16


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation. No horizontal flip by default: text and emoji are not mirror-symmetric.

    The style transforms are off by default (probability 0). Each row takes each one with its probability,
    independently, in the order of the fields below."""

    crop_scale: tuple[float, float] = (0.7, 1.0)  # random resized crop: area fraction kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    hflip: bool = False
    # transparent pixels composited on a uniformly random colour instead of the preprocessing background (the
    # images' alpha is then kept beside their pixels)
    background_prob: float = 0.0
    # each pixel takes the colour of the darkest pixel (by luminance) of its 3×3 neighbourhood: dark lines and
    # outlines one pixel wider on each side
    outline_prob: float = 0.0
    # the picture replaced by its edge map: the Sobel magnitude of luminance, dark on the row's background colour
    edges_prob: float = 0.0
    # colour jitter (torchvision's ColorJitter, in a fixed order): brightness, contrast and saturation factors
    # uniform in [1 - s, 1 + s], then the hue turned by up to ±`hue` of a full turn (in the YIQ chroma plane)
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0  # luminance (ITU-R 601, Pillow's "L") in all three channels
    posterize_prob: float = 0.0
    posterize_bits: tuple[int, int] = (2, 5)  # each channel to 2^bits levels, bits uniform in the range
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # Gaussian blur, sigma uniform in the range, in input pixels

    def __post_init__(self):
        for name in PROBABILITIES:
            _require(_is_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1, name,
                     "a probability in [0, 1]", getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            _require(_is_number(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0",
                     getattr(self, name))
        _require(_is_number(self.hue) and 0 <= self.hue <= 0.5, "hue", "in [0, 0.5] (a fraction of a full turn)",
                 self.hue)
        _require(_is_pair(self.blur_sigma, _is_number) and 0 < self.blur_sigma[0] <= self.blur_sigma[1],
                 "blur_sigma", "[low, high] with 0 < low <= high", self.blur_sigma)
        bits = self.posterize_bits
        _require(_is_pair(bits, _is_int) and 1 <= bits[0] <= bits[1] <= 8, "posterize_bits",
                 "[low, high], integers with 1 <= low <= high <= 8", bits)

    @property
    def has_style(self) -> bool:
        """Whether any style transform is on."""
        return any(getattr(self, name) > 0 for name in PROBABILITIES)

    @property
    def keeps_alpha(self) -> bool:
        """Whether training needs the images' opacity beside their pixels (background augmentation)."""
        return self.background_prob > 0


def _require(holds: bool, name: str, what: str, value) -> None:
    if not holds:
        raise ValueError(f"augment.{name} must be {what}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pair(value, kind) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(kind(v) for v in value)


def with_style_preset(preset: str, augment: dict) -> dict:
    """The `augment` fields of a --style-augment preset, overridden by the fields given."""
    if preset not in STYLE_PRESETS:
        raise ValueError(f"style_augment must be one of {', '.join(STYLE_PRESETS)}, got {preset!r}")
    return {**STYLE_PRESETS[preset], **augment}


# ---------------------------------------------------------------------------------------------- draws


class StyleDraws(NamedTuple):
    """Each row's style: which transforms it takes ((B,) bool) and their parameters."""

    background: torch.Tensor
    colour: torch.Tensor  # (B, 3) the new background colour, in [0, 1]
    outline: torch.Tensor
    edges: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor  # (B, 4) brightness, contrast and saturation factors; hue turn
    grayscale: torch.Tensor
    posterize: torch.Tensor
    bits: torch.Tensor  # (B,) int64
    blur: torch.Tensor
    sigma: torch.Tensor  # (B,) pixels

    def rows(self, rows: slice) -> StyleDraws:
        return StyleDraws(*(draw[rows] for draw in self))

    def to(self, device: torch.device | str) -> StyleDraws:
        return StyleDraws(*(draw.to(device) for draw in self))

    @property
    def styled(self) -> torch.Tensor:
        """(B,) bool: the rows that take at least one transform."""
        return torch.stack([self.background, self.outline, self.edges, self.jitter, self.grayscale, self.posterize,
                            self.blur]).any(0)


def style_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's style draws, a stream apart from the step's other draws."""
    state = np.random.SeedSequence([_STYLE_SEEDS, seed % 2**64, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_styles(aug: AugmentConfig, batch: int, gen: torch.Generator) -> StyleDraws:
    """Every row's style choices for a batch of `batch` rows."""
    u = torch.rand(batch, _DRAWS, generator=gen)
    strengths = torch.tensor([aug.brightness, aug.contrast, aug.saturation])
    factors = torch.cat([(1 + strengths * (2 * u[:, 7:10] - 1)).clamp(min=0), aug.hue * (2 * u[:, 10:11] - 1)], 1)
    low_bits, high_bits = aug.posterize_bits
    bits = low_bits + (u[:, 13] * (high_bits - low_bits + 1)).long().clamp(max=high_bits - low_bits)
    low_sigma, high_sigma = aug.blur_sigma
    return StyleDraws(
        background=u[:, 0] < aug.background_prob, colour=u[:, 1:4], outline=u[:, 4] < aug.outline_prob,
        edges=u[:, 5] < aug.edges_prob, jitter=u[:, 6] < aug.jitter_prob, factors=factors,
        grayscale=u[:, 11] < aug.grayscale_prob, posterize=u[:, 12] < aug.posterize_prob, bits=bits,
        blur=u[:, 14] < aug.blur_prob, sigma=low_sigma + (high_sigma - low_sigma) * u[:, 15])


# ---------------------------------------------------------------------------------------------- batches


def style_rows(pixels: torch.Tensor, alpha: torch.Tensor | None, aug: AugmentConfig, preprocess: PreprocessConfig,
               seed: int, step: int, rows: slice, global_batch: int) -> torch.Tensor:
    """Rows `rows` of step `step`'s global batch of `global_batch` rows, styled: normalised pixels (b, 3, H, W) by
    `preprocess`'s mean and std, with their opacity (b, 1, H, W) in [0, 1] when background augmentation is on. A
    row that takes no transform comes back unchanged, bit for bit."""
    draws = draw_styles(aug, global_batch, style_generator(seed, step)).rows(rows).to(pixels.device)
    mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (preprocess.mean, preprocess.std))
    background = torch.tensor(preprocess.background, device=pixels.device) / 255
    alpha = alpha.to(pixels.device) if alpha is not None else None
    styled = apply_styles(pixels * std + mean, alpha, draws, aug, background)
    return torch.where(draws.styled[:, None, None, None], (styled - mean) / std, pixels)


def apply_styles(x: torch.Tensor, alpha: torch.Tensor | None, draws: StyleDraws, aug: AugmentConfig,
                 background: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [0, 1] with each row's drawn transforms, in `AugmentConfig`'s order. `background`
    (3,) is the colour transparent pixels were composited on; `alpha` (B, 1, H, W) their opacity, needed only
    when a row draws a new background."""
    if alpha is None and bool(draws.background.any()):
        raise ValueError("background augmentation needs the images' alpha")
    row_background = torch.where(draws.background[:, None], draws.colour, background)  # (B, 3)
    x = _on_rows(x, draws.background, lambda rows, a, c: recolour_background(rows, a, background, c),
                 alpha, row_background)
    x = _on_rows(x, draws.outline, thicken_outlines)
    x = _on_rows(x, draws.edges, edge_map, row_background)
    x = _on_rows(x, draws.jitter, colour_jitter, draws.factors)
    x = _on_rows(x, draws.grayscale, grayscale)
    x = _on_rows(x, draws.posterize, posterize, draws.bits)
    radius = math.ceil(3 * aug.blur_sigma[1])  # from the config, not the rows: the same kernel in any share
    return _on_rows(x, draws.blur, lambda rows, sigma: gaussian_blur(rows, sigma, radius), draws.sigma)


def _on_rows(x: torch.Tensor, which: torch.Tensor, transform, *per_row: torch.Tensor) -> torch.Tensor:
    """x with `transform(x[which], *(p[which] for p in per_row))` in the rows `which` marks."""
    if not bool(which.any()):
        return x
    index = which.nonzero().squeeze(1)
    out = x.clone()
    out[index] = transform(x[index], *(p[index] for p in per_row))
    return out


# ---------------------------------------------------------------------------------------------- transforms


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) ITU-R 601 luma of (B, 3, H, W) RGB, as Pillow's "L"."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def recolour_background(x: torch.Tensor, alpha: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Pixels composited on `old` (3,) with opacity `alpha` (B, 1, H, W), recomposited on `new` (B, 3): x + (1 - α)
    (new - old), exact through a (linear) resize of both."""
    return (x + (1 - alpha) * (new - old)[:, :, None, None]).clamp(0, 1)


def thicken_outlines(x: torch.Tensor) -> torch.Tensor:
    """Each pixel takes the colour of the darkest pixel (by luminance) of its 3×3 neighbourhood, the image's edges
    replicated: morphological erosion, which widens dark lines by a pixel on each side."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    lum = luminance(padded)
    best, best_lum = x, lum[..., 1:height + 1, 1:width + 1]
    for dy in range(3):
        for dx in range(3):
            lum_here = lum[..., dy:dy + height, dx:dx + width]
            darker = lum_here < best_lum  # strict: ties keep the earlier pixel, a fixed choice
            best = torch.where(darker, padded[..., dy:dy + height, dx:dx + width], best)
            best_lum = torch.where(darker, lum_here, best_lum)
    return best


def edge_map(x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The picture replaced by its edges: the Sobel magnitude of luminance, drawn black from a step of half the
    luminance range up, on each row's `background` (B, 3) colour; a flat picture becomes its plain background."""
    height, width = x.shape[-2:]
    lum = F.pad(luminance(x), (1, 1, 1, 1), mode="replicate")

    def at(dy: int, dx: int) -> torch.Tensor:
        return lum[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    strength = (torch.sqrt(gx * gx + gy * gy) / 2).clamp(max=1)  # (B, 1, H, W); a unit step's magnitude is 4
    return background[:, :, None, None] * (1 - strength)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with each row's `factors` (B, 4): blends towards black (brightness), the mean grey
    (contrast) and the grey picture (saturation), then a hue turn; clamped to [0, 1] after each."""
    brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
    x = (x * brightness).clamp(0, 1)
    mean = luminance(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
    x = (saturation * x + (1 - saturation) * luminance(x)).clamp(0, 1)
    return turn_hue(x, factors[:, 3])


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def turn_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue turned by `turns` (B,) of a full turn: a rotation of the YIQ chroma plane (luma kept)."""
    angle = 2 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(turns), 3, 3, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = _YIQ_TO_RGB.to(x.device) @ rotation @ _RGB_TO_YIQ.to(x.device)  # (B, 3, 3)
    # a sum over 3 terms rather than a batched matmul: a row's result does not depend on the batch around it
    return (matrix[:, :, :, None, None] * x[:, None]).sum(2).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """The luminance in all three channels."""
    return luminance(x).expand(-1, 3, -1, -1).contiguous()


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Each channel quantised to 2^bits levels spread over [0, 1] (black and white stay), `bits` (B,) per row."""
    levels = (2.0 ** bits.to(x.dtype))[:, None, None, None]
    return torch.floor(x * levels).clamp(max=levels - 1) / (levels - 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each row blurred by a separable Gaussian of its own `sigma` (B,) pixels over ±`radius` pixels, the image's
    edges replicated."""
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True))[:, :, None, None, None]  # (B, 2r + 1, 1, 1, 1)
    height, width = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = sum(weights[:, k] * padded[..., k:k + width] for k in range(2 * radius + 1))
    padded = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return sum(weights[:, k] * padded[..., k:k + height, :] for k in range(2 * radius + 1))
