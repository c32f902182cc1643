"""What the style augmentations do to the emoji the model trains on: each transform alone, then random draws of the
`light` and `strong` presets, at the model's input size (32 px, drawn enlarged), beside the same emoji in Twemoji's
style, which a model trained on Noto never sees. Writes docs/style-augment.png.

    python bench/style_examples.py --data .cache/data/emoji-16.0.0-google-twitter
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.preprocess import PreprocessConfig, alpha_channel, open_image, resize, resize_alpha
from training.augment import STYLE_PRESETS, AugmentConfig, apply_styles, draw_styles, style_generator

EMOJI = ("1f98a", "1f63a", "2764-fe0f", "1f34e", "1f697", "1f1eb-1f1f7")  # fox, cat, heart, apple, car, flag
ALONE = {"background": {"background_prob": 1.0}, "outline": {"outline_prob": 1.0}, "edges": {"edges_prob": 1.0},
         "jitter": {"jitter_prob": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.05},
         "grayscale": {"grayscale_prob": 1.0}, "posterize": {"posterize_prob": 1.0, "posterize_bits": (2, 2)},
         "blur": {"blur_prob": 1.0, "blur_sigma": (1.0, 1.0)}}
DRAWS = 3  # random draws shown per preset


def load(path: Path, preprocess: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) pixels in [0, 1] and (1, H, W) opacity of one image, as training sees them before styling."""
    image = open_image(path)
    pixels = torch.from_numpy(resize(image, preprocess)).permute(2, 0, 1).float() / 255
    return pixels, torch.from_numpy(resize_alpha(alpha_channel(image), preprocess)).float()[None] / 255


def styled(pixels: torch.Tensor, alpha: torch.Tensor, fields: dict, seed: int) -> torch.Tensor:
    """The images with the style transforms of `fields`, drawn from `seed`."""
    aug = AugmentConfig(**fields)
    draws = draw_styles(aug, len(pixels), style_generator(seed, 0))
    return apply_styles(pixels, alpha, draws, aug, torch.tensor([1.0, 1.0, 1.0])).clamp(0, 1)


def columns(pixels: torch.Tensor, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """Column title → (N, 3, H, W) images: the original, each transform alone, then the presets' draws."""
    shown = {"Noto (trained)": pixels}
    shown.update({name: styled(pixels, alpha, fields, seed=1) for name, fields in ALONE.items()})
    for preset in ("light", "strong"):
        shown.update({f"{preset} #{d + 1}": styled(pixels, alpha, STYLE_PRESETS[preset], seed=10 + d)
                      for d in range(DRAWS)})
    return shown


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0-google-twitter")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "style-augment.png"))
    args = parser.parse_args()
    preprocess = PreprocessConfig(image_size=args.image_size)
    images = Path(args.data) / "images"
    loaded = [load(images / "google" / f"{code}.png", preprocess) for code in EMOJI]
    pixels, alpha = (torch.stack(parts) for parts in zip(*loaded, strict=True))
    shown = columns(pixels, alpha)
    shown["Twemoji (never seen)"] = torch.stack([load(images / "twitter" / f"{code}.png", preprocess)[0]
                                                 for code in EMOJI])
    fig, axes = plt.subplots(len(EMOJI), len(shown), figsize=(1.1 * len(shown), 1.15 * len(EMOJI)))
    for col, (title, batch) in enumerate(shown.items()):
        for row in range(len(EMOJI)):
            ax = axes[row, col]
            ax.imshow(np.asarray(batch[row].permute(1, 2, 0)), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(args.output, dpi=110)
    print(args.output)


if __name__ == "__main__":
    main()
