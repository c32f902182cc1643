"""Training batches: a compact in-memory cache of preprocessed images and tokenized captions, and a stateless
sampler whose every random choice derives from (seed, step), which is what makes resume and DDP exact."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.preprocess import PreprocessConfig, normalize, resize
from core.tokenizer import TextTokenizer
from training.augment import AugmentConfig


@dataclasses.dataclass
class TrainCache:
    """(N, 3, H, W) normalised float16 pixels and every caption tokenized, with per-sample caption offsets."""

    pixels: torch.Tensor
    tokens: torch.Tensor  # (total captions, L) int64
    offsets: torch.Tensor  # (N + 1,) start of each sample's captions in `tokens`
    label_tokens: torch.Tensor | None = None  # (N, L) each sample's label prompt ("a cat face emoji"), tokenized
    has_label: torch.Tensor | None = None  # (N,) bool: the sample has that label (else its row is padding)
    alpha: torch.Tensor | None = None  # (N, 1, H, W) uint8 opacity of the pixels, for background augmentation

    def __len__(self) -> int:
        return self.pixels.shape[0]


def build_cache(samples: Iterable, preprocess: PreprocessConfig, tokenizer: TextTokenizer,
                progress: bool = True, label_prompts: list[str | None] | None = None,
                alphas: Sequence[np.ndarray] | None = None) -> TrainCache:
    """Resize and normalise each image once (the shared eval transform) and tokenize all its captions, and, when
    given, each sample's label prompt (None: the sample has no label) and opacity ((H, W) uint8, `resize_alpha`)."""
    pixels, token_rows, offsets = [], [], [0]
    for sample in tqdm(samples, desc="cache", unit="img", disable=not progress, leave=False):
        pixels.append(normalize(resize(sample.image, preprocess), preprocess).astype(np.float16))
        token_rows.append(tokenizer.encode(list(sample.texts)))
        offsets.append(offsets[-1] + len(sample.texts))
    if not pixels:
        raise ValueError("no training samples")
    cache = TrainCache(torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.concatenate(token_rows)),
                       torch.tensor(offsets))
    if label_prompts is not None:
        if len(label_prompts) != len(cache):
            raise ValueError(f"{len(label_prompts)} label prompts for {len(cache)} samples")
        cache.label_tokens = torch.from_numpy(tokenizer.encode([p or "" for p in label_prompts]))
        cache.has_label = torch.tensor([p is not None for p in label_prompts])
    if alphas is not None:
        if len(alphas) != len(cache):
            raise ValueError(f"{len(alphas)} alpha masks for {len(cache)} samples")
        cache.alpha = torch.from_numpy(np.stack(alphas))[:, None]
    return cache


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator owned by one optimisation step: same (seed, step) → same batch, whatever ran before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch + 1))


def random_crop_grids(batch: int, size: int, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, size, size, 2) sampling grids of random resized crops (affine_grid coordinates)."""
    u = torch.rand(batch, 5, generator=gen)
    area = aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)
    sx = torch.where((u[:, 4] < 0.5) & aug.hflip, -w, w)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    return F.affine_grid(theta, [batch, 3, size, size], align_corners=False)


class BatchSampler:
    """Global batches without replacement per epoch; rank r takes rows [r·B/W, (r+1)·B/W) of the global batch.

    Each sample's caption is one of its captions at random; with probability `label_prompt_prob` it is its label
    prompt instead (samples with a label in the cache), which mixes image–label pairs into image–text training."""

    def __init__(self, cache: TrainCache, global_batch: int, seed: int, augment: AugmentConfig | None,
                 label_prompt_prob: float = 0.0):
        if global_batch > len(cache):
            raise ValueError(f"batch size {global_batch} exceeds the {len(cache)} training samples")
        if not 0.0 <= label_prompt_prob <= 1.0:
            raise ValueError(f"label_prompt_prob must be in [0, 1], got {label_prompt_prob}")
        if label_prompt_prob and cache.label_tokens is None:
            raise ValueError("label_prompt_prob > 0 needs a cache built with label prompts")
        self.cache, self.global_batch, self.seed, self.augment = cache, global_batch, seed, augment
        self.label_prompt_prob = label_prompt_prob
        self.steps_per_epoch = len(cache) // global_batch
        self._last_draws: tuple[int, tuple] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.cache)

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.cache), self.seed, epoch)
        return order[within * self.global_batch:(within + 1) * self.global_batch]

    def _draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Step's random choices for the global batch: (indices, caption rows, crop grids, label-prompt rows).

        The last step's are kept, so `batch` and `label_prompt_rows` of one step draw once; callers must not
        modify the tensors."""
        if self._last_draws is not None and self._last_draws[0] == step:
            return self._last_draws[1]
        idx = self.global_indices(step)
        gen = step_generator(self.seed, step)
        n_caps = self.cache.offsets[idx + 1] - self.cache.offsets[idx]
        caption_rows = self.cache.offsets[idx] + (torch.rand(len(idx), generator=gen) * n_caps).long()
        grids = None
        if self.augment is not None:
            grids = random_crop_grids(len(idx), self.cache.pixels.shape[-1], self.augment, gen)
        use = torch.zeros(len(idx), dtype=torch.bool)
        if self.label_prompt_prob:  # drawn after the crops, so a run without label prompts keeps its batches
            use = (torch.rand(len(idx), generator=gen) < self.label_prompt_prob) & self.cache.has_label[idx]
        self._last_draws = (step, (idx, caption_rows, grids, use))
        return idx, caption_rows, grids, use

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (b, 3, H, W) float32, input_ids (b, L)) for this rank's share of step's global batch."""
        idx, caption_rows, grids, use = self._draws(step)
        tokens = self.cache.tokens[caption_rows]
        if use.any():
            tokens = torch.where(use[:, None], self.cache.label_tokens[idx], tokens)
        share = rank_rows(len(idx), rank, world_size)
        return _crop(self.cache.pixels[idx[share]].float(), grids, share), tokens[share]

    def label_prompt_rows(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """(b,) bool: which rows of `batch(step, rank, world_size)` carry their label prompt instead of a caption."""
        use = self._draws(step)[3]
        return use[rank_rows(len(use), rank, world_size)]

    def alpha(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
        """(b, 1, H, W) float32 in [0, 1]: the opacity of `batch(step, rank, world_size)`'s pixels, cropped alike;
        None when the cache holds none."""
        if self.cache.alpha is None:
            return None
        idx, _, grids, _ = self._draws(step)
        share = rank_rows(len(idx), rank, world_size)
        return _crop(self.cache.alpha[idx[share]].float() / 255, grids, share)


def _crop(images: torch.Tensor, grids: torch.Tensor | None, share: slice) -> torch.Tensor:
    """The rows' random resized crops (their grids: rows `share` of the global batch's); unchanged without."""
    if grids is None:
        return images
    return F.grid_sample(images, grids[share], mode="bilinear", padding_mode="border", align_corners=False)


def rank_rows(batch: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s rows of a global batch of `batch` rows."""
    return slice(rank * batch // world_size, (rank + 1) * batch // world_size)
