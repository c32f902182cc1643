"""Batches are a pure function of (seed, step): what makes resume exact and DDP shards add up to one batch."""

from __future__ import annotations

import pytest
import torch

from core.preprocess import PreprocessConfig, preprocess_image
from core.tokenizer import train_tokenizer
from training.batches import AugmentConfig, BatchSampler, TrainCache, build_cache, random_crop_grids


def make_cache(n: int = 12, size: int = 8) -> TrainCache:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, size, size, generator=gen).half()
    tokens = torch.arange(n * 2 * 4).view(n * 2, 4)  # two captions per sample, distinguishable rows
    return TrainCache(pixels, tokens, torch.arange(0, 2 * n + 1, 2))


def test_same_step_same_batch_whatever_ran_before():
    sampler = BatchSampler(make_cache(), 4, seed=3, augment=AugmentConfig())
    first = sampler.batch(5)
    for step in range(5):
        sampler.batch(step)
    again = sampler.batch(5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_rank_shares_concatenate_to_the_global_batch():
    sampler = BatchSampler(make_cache(), 6, seed=1, augment=AugmentConfig())
    whole_pixels, whole_ids = sampler.batch(2)
    shares = [sampler.batch(2, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([p for p, _ in shares]), whole_pixels)
    assert torch.equal(torch.cat([t for _, t in shares]), whole_ids)


def test_an_epoch_visits_every_sample_once():
    cache = make_cache(12)
    sampler = BatchSampler(cache, 4, seed=0, augment=None)
    seen = torch.cat([sampler.global_indices(step) for step in range(sampler.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(12))


def test_captions_come_from_the_sample_itself():
    cache = make_cache(12)
    sampler = BatchSampler(cache, 4, seed=0, augment=None)
    idx = sampler.global_indices(0)
    _, ids = sampler.batch(0)
    rows = (ids[:, 0] // 4).tolist()  # token row number of each chosen caption
    assert all(row // 2 == sample for row, sample in zip(rows, idx.tolist()))


def test_without_augmentation_pixels_are_the_eval_transform():
    cache = make_cache(12)
    sampler = BatchSampler(cache, 4, seed=0, augment=None)
    pixels, _ = sampler.batch(0)
    assert torch.equal(pixels, cache.pixels[sampler.global_indices(0)].float())


def test_full_crop_is_the_identity():
    grids = random_crop_grids(3, 8, AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)),
                              torch.Generator().manual_seed(0))
    x = torch.rand(3, 3, 8, 8)
    out = torch.nn.functional.grid_sample(x, grids, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(out, x, atol=1e-6)


def test_cache_uses_the_shared_eval_transform(shapes_data):
    from core.data import load_samples

    samples, _ = load_samples(str(shapes_data), split="train")
    preprocess = PreprocessConfig(image_size=16)
    tokenizer = train_tokenizer((t for s in samples for t in s.texts), 300, 12)
    cache = build_cache(samples[:3], preprocess, tokenizer, progress=False)
    expected = torch.from_numpy(preprocess_image(samples[1].image, preprocess))
    assert torch.allclose(cache.pixels[1].float(), expected, atol=1e-2)  # stored as float16
    assert cache.offsets.tolist() == [0, 3, 6, 9]


def test_the_opacity_is_cropped_as_the_pixels_are_and_leaves_them_unchanged():
    plain = BatchSampler(make_cache(12), 6, seed=4, augment=AugmentConfig())
    cache = make_cache(12)
    cache.alpha = (cache.pixels[:, :1].float() * 255).round().to(torch.uint8)  # opacity: the red channel
    sampler = BatchSampler(cache, 6, seed=4, augment=AugmentConfig())
    assert plain.alpha(0) is None
    for step in range(3):
        pixels, _ = sampler.batch(step)
        assert torch.equal(pixels, plain.batch(step)[0])
        assert torch.allclose(sampler.alpha(step), pixels[:, :1], atol=1 / 255)
        assert torch.equal(torch.cat([sampler.alpha(step, rank, 2) for rank in range(2)]), sampler.alpha(step))


def test_the_cache_keeps_the_opacity_it_is_given(shapes_data):
    from core.data import load_samples

    samples, _ = load_samples(str(shapes_data), split="train")
    preprocess = PreprocessConfig(image_size=16)
    tokenizer = train_tokenizer((t for s in samples for t in s.texts), 300, 12)
    alphas = [torch.randint(0, 256, (16, 16), dtype=torch.uint8).numpy() for _ in samples[:3]]
    cache = build_cache(samples[:3], preprocess, tokenizer, progress=False, alphas=alphas)
    assert cache.alpha.shape == (3, 1, 16, 16) and torch.equal(cache.alpha[2, 0], torch.from_numpy(alphas[2]))
    with pytest.raises(ValueError, match="alpha"):
        build_cache(samples[:3], preprocess, tokenizer, progress=False, alphas=alphas[:2])


def with_label_prompts(cache: TrainCache, labelled: list[bool]) -> TrainCache:
    """Label prompt of sample i: the row [-1-i]*4, told apart from every caption row (all >= 0)."""
    cache.label_tokens = -1 - torch.arange(len(cache)).view(-1, 1).repeat(1, 4)
    cache.has_label = torch.tensor(labelled)
    return cache


def test_label_prompts_replace_about_that_share_of_captions_and_only_for_labelled_samples():
    labelled = [i % 3 != 0 for i in range(12)]  # samples 0, 3, 6, 9 have no label
    sampler = BatchSampler(with_label_prompts(make_cache(12), labelled), 4, seed=0, augment=None,
                           label_prompt_prob=0.5)
    used, eligible = 0, 0
    for step in range(300):
        idx = sampler.global_indices(step)
        _, ids = sampler.batch(step)
        prompt = ids[:, 0] < 0
        assert torch.equal(ids[prompt, 0], -1 - idx[prompt])  # a sample's own label prompt
        assert torch.equal(sampler.label_prompt_rows(step), prompt)  # what the nCLIP loss is told
        assert not prompt[torch.tensor([not labelled[i] for i in idx.tolist()])].any()
        used += int(prompt.sum())
        eligible += sum(labelled[i] for i in idx.tolist())
    assert 0.4 < used / eligible < 0.6


def test_each_rank_is_told_which_of_its_rows_are_label_prompts():
    sampler = BatchSampler(with_label_prompts(make_cache(12), [True] * 12), 6, seed=1, augment=None,
                           label_prompt_prob=0.5)
    for step in range(4):
        shares = [sampler.label_prompt_rows(step, rank, 3) for rank in range(3)]
        assert torch.equal(torch.cat(shares), sampler.label_prompt_rows(step))
        for rank, share in enumerate(shares):
            assert torch.equal(share, sampler.batch(step, rank, 3)[1][:, 0] < 0)
    assert not BatchSampler(make_cache(12), 4, seed=0, augment=None).label_prompt_rows(0).any()


def test_label_prompts_off_leave_the_batches_unchanged():
    plain = BatchSampler(make_cache(12), 4, seed=2, augment=AugmentConfig())
    off = BatchSampler(with_label_prompts(make_cache(12), [True] * 12), 4, seed=2, augment=AugmentConfig())
    for step in range(6):
        assert all(torch.equal(a, b) for a, b in zip(plain.batch(step), off.batch(step), strict=True))


def test_label_prompt_prob_needs_prompts_and_a_probability():
    with pytest.raises(ValueError, match="label prompts"):
        BatchSampler(make_cache(12), 4, seed=0, augment=None, label_prompt_prob=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BatchSampler(with_label_prompts(make_cache(12), [True] * 12), 4, seed=0, augment=None,
                     label_prompt_prob=1.5)
