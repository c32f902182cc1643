"""Style augmentations: each transform does what its name says on a hand-built picture; the draws are a function
of (seed, step, row), whatever share of the batch a process holds; `train --style-augment` trains in both data
modes, and a styled run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from core.preprocess import PreprocessConfig
from training.augment import (
    STYLE_PRESETS,
    AugmentConfig,
    colour_jitter,
    draw_styles,
    edge_map,
    gaussian_blur,
    grayscale,
    luminance,
    posterize,
    recolour_background,
    style_generator,
    style_rows,
    thicken_outlines,
    turn_hue,
)
from training.testing import train_run
from xclip_serve.cli import app

STRONG = AugmentConfig(**STYLE_PRESETS["strong"])
WHITE = torch.ones(3)


def pictures(n: int = 2, size: int = 12) -> torch.Tensor:
    """(n, 3, size, size) random colours in [0, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n * size))


def white_with_line(size: int = 9, column: int = 4) -> torch.Tensor:
    """(1, 3, size, size): a white picture with a 1-pixel black vertical line."""
    x = torch.ones(1, 3, size, size)
    x[..., column] = 0
    return x


def high_frequency_energy(x: torch.Tensor) -> float:
    """Sum of squared differences between horizontal and vertical neighbours."""
    return float((x.diff(dim=-1) ** 2).sum() + (x.diff(dim=-2) ** 2).sum())


# ---------------------------------------------------------------------------------------------- transforms


def test_grayscale_makes_the_three_channels_equal_to_the_luminance():
    out = grayscale(pictures())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.allclose(out[:, :1], luminance(pictures()))


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_posterize_leaves_at_most_two_to_the_bits_levels_per_channel(bits):
    x = torch.cat([pictures(), torch.zeros(1, 3, 12, 12), torch.ones(1, 3, 12, 12)])
    out = posterize(x, torch.full((len(x),), bits))
    for channel in range(3):
        assert len(out[:, channel].unique()) <= 2 ** bits
    assert torch.equal(out[-2:], x[-2:])  # black and white stay
    assert (out - x).abs().max() <= 1 / (2 ** bits - 1)


def test_a_new_background_changes_only_the_formerly_transparent_pixels_into_the_drawn_colour():
    foreground = pictures(1)
    alpha = torch.zeros(1, 1, 12, 12)
    alpha[..., 3:9, 2:10] = 1
    composited = alpha * foreground + (1 - alpha) * WHITE[:, None, None]  # as `to_rgb` composites on white
    colour = torch.tensor([[0.2, 0.5, 0.9]])
    out = recolour_background(composited, alpha, WHITE, colour)
    opaque = alpha[0, 0].bool()
    assert torch.equal(out[0][:, opaque], composited[0][:, opaque])
    assert torch.allclose(out[0][:, ~opaque], colour[0][:, None].expand(3, int((~opaque).sum())))


def test_a_half_transparent_pixel_is_recomposited_on_the_new_colour():
    foreground, colour = torch.tensor([0.8, 0.1, 0.3]), torch.tensor([[0.2, 0.5, 0.9]])
    composited = (0.5 * foreground + 0.5 * WHITE).view(1, 3, 1, 1)
    out = recolour_background(composited, torch.full((1, 1, 1, 1), 0.5), WHITE, colour)
    assert torch.allclose(out.flatten(), 0.5 * foreground + 0.5 * colour[0])


def test_blur_removes_high_frequencies_and_keeps_the_mean():
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)) % 2).float().expand(1, 3, 16, 16)
    out = gaussian_blur(checkerboard, torch.tensor([1.0]), radius=3)
    assert high_frequency_energy(out) < 0.05 * high_frequency_energy(checkerboard)
    assert float(out.mean()) == pytest.approx(float(checkerboard.mean()), abs=1e-3)
    sharper = gaussian_blur(checkerboard, torch.tensor([0.3]), radius=3)
    assert high_frequency_energy(out) < high_frequency_energy(sharper)


def test_outline_thickening_grows_a_one_pixel_dark_line_to_three():
    out = thicken_outlines(white_with_line(column=4))
    dark_columns = (out[0, 0] < 0.5).all(dim=0).nonzero().flatten().tolist()
    assert dark_columns == [3, 4, 5]
    assert (out[0, :, :, [0, 1, 2, 6, 7, 8]] == 1).all()


def test_outline_thickening_carries_the_dark_pixel_colour():
    x = torch.ones(1, 3, 5, 5)
    x[0, :, 2, 2] = torch.tensor([0.6, 0.0, 0.0])  # a dark red dot
    out = thicken_outlines(x)
    assert torch.equal(out[0, :, 1:4, 1:4], x[0, :, 2:3, 2:3].expand(3, 3, 3))
    assert (out[0, :, 0] == 1).all() and (out[0, :, :, 4] == 1).all()


def test_the_edge_map_of_a_flat_picture_is_its_plain_background():
    flat = torch.full((2, 3, 8, 8), 0.4)
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.7, 0.3]])
    assert torch.equal(edge_map(flat, colours), colours[:, :, None, None].expand(2, 3, 8, 8))


def test_the_edge_map_draws_a_step_dark_and_the_rest_on_the_background():
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1
    out = edge_map(step, WHITE[None])
    assert (out[0, :, :, 3:5] == 0).all()  # both sides of the step: black
    assert (out[0, :, :, [0, 1, 2, 5, 6, 7]] == 1).all()


@pytest.mark.parametrize("factors, expected", [
    ((1.0, 1.0, 1.0, 0.0), lambda x: x),  # identity
    ((0.5, 1.0, 1.0, 0.0), lambda x: x / 2),  # brightness
    ((1.0, 0.0, 1.0, 0.0), lambda x: luminance(x).mean().expand_as(x)),  # no contrast: the mean grey
    ((1.0, 1.0, 0.0, 0.0), lambda x: luminance(x).expand_as(x)),  # no saturation: the grey picture
    ((1.0, 1.0, 1.0, 1.0), lambda x: x),  # a full hue turn
])
def test_colour_jitter_factors(factors, expected):
    x = pictures(1) * 0.8 + 0.1  # away from the clamps
    assert torch.allclose(colour_jitter(x, torch.tensor([factors])), expected(x), atol=1e-5)


def test_a_hue_turn_changes_the_colours_but_keeps_the_luminance():
    x = pictures(1) * 0.4 + 0.3  # away from the clamps
    out = turn_hue(x, torch.tensor([0.25]))
    assert (out - x).abs().max() > 0.05
    assert torch.allclose(luminance(out), luminance(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------- draws


def styled(aug: AugmentConfig, step: int, rows: slice, batch: int = 16, seed: int = 0) -> torch.Tensor:
    """`style_rows` on rows `rows` of a fixed global batch of normalised pixels with random opacity."""
    pixels = pictures(batch) * 2 - 1
    alpha = torch.rand(batch, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    return style_rows(pixels[rows], alpha[rows], aug, PreprocessConfig(image_size=12), seed, step, rows, batch)


def test_the_same_seed_and_step_give_the_same_styles_and_others_differ():
    whole = styled(STRONG, 3, slice(0, 16))
    assert torch.equal(styled(STRONG, 3, slice(0, 16)), whole)
    assert not torch.equal(styled(STRONG, 4, slice(0, 16)), whole)
    assert not torch.equal(styled(STRONG, 3, slice(0, 16), seed=1), whole)


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ranks_rows_together_are_the_one_process_batch(world_size):
    for step in range(4):
        whole = styled(STRONG, step, slice(0, 16))
        shares = [styled(STRONG, step, slice(16 * r // world_size, 16 * (r + 1) // world_size))
                  for r in range(world_size)]
        assert torch.equal(torch.cat(shares), whole)


def test_rows_without_a_drawn_transform_are_unchanged_bit_for_bit():
    pixels = pictures(16) * 2 - 1
    aug = AugmentConfig(blur_prob=0.5)
    out = styled(aug, 0, slice(0, 16))
    untouched = ~draw_styles(aug, 16, style_generator(0, 0)).blur
    assert 0 < int(untouched.sum()) < 16
    assert torch.equal(out[untouched], pixels[untouched]) and not torch.equal(out, pixels)


def test_the_default_config_has_no_style_and_turning_one_on_keeps_the_others_draws():
    assert not AugmentConfig().has_style and not AugmentConfig().keeps_alpha
    plain = draw_styles(AugmentConfig(grayscale_prob=0.3), 64, style_generator(0, 5))
    with_blur = draw_styles(AugmentConfig(grayscale_prob=0.3, blur_prob=0.5), 64, style_generator(0, 5))
    assert torch.equal(plain.grayscale, with_blur.grayscale) and not with_blur.grayscale.all()


def test_each_transform_is_drawn_about_as_often_as_its_probability():
    draws = draw_styles(STRONG, 4000, style_generator(0, 0))
    for name in ("background", "outline", "edges", "jitter", "grayscale", "posterize", "blur"):
        assert float(getattr(draws, name).float().mean()) == pytest.approx(getattr(STRONG, f"{name}_prob"), abs=0.03)
    assert set(draws.bits.unique().tolist()) == set(range(STRONG.posterize_bits[0], STRONG.posterize_bits[1] + 1))
    assert STRONG.blur_sigma[0] <= float(draws.sigma.min()) and float(draws.sigma.max()) <= STRONG.blur_sigma[1]


def test_background_augmentation_without_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        style_rows(pictures(4), None, AugmentConfig(background_prob=1.0), PreprocessConfig(image_size=12), 0, 0,
                   slice(0, 4), 4)


@pytest.mark.parametrize("fields, key", [
    ({"blur_prob": 1.5}, "augment.blur_prob"),
    ({"background_prob": -0.1}, "augment.background_prob"),
    ({"jitter_prob": "often"}, "augment.jitter_prob"),
    ({"brightness": -0.2}, "augment.brightness"),
    ({"hue": 0.6}, "augment.hue"),
    ({"blur_sigma": (-1.0, 1.0)}, "augment.blur_sigma"),
    ({"blur_sigma": (2.0, 1.0)}, "augment.blur_sigma"),
    ({"posterize_bits": (0, 4)}, "augment.posterize_bits"),
    ({"posterize_bits": (2, 9)}, "augment.posterize_bits"),
    ({"posterize_bits": (2.5, 4)}, "augment.posterize_bits"),
])
def test_bad_values_are_refused_naming_their_key(fields, key):
    with pytest.raises(ValueError, match=key):
        AugmentConfig(**fields)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("data_mode", ["cache", "stream"])
def test_train_with_the_strong_preset_runs_and_records_it(shapes_data, tmp_path, data_mode):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--data", str(shapes_data), "--output", str(run), "--model", "tiny", "--objective", "clip",
        "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--precision", "fp32", "--eval-every", "0",
        "--data-mode", data_mode, "--stream-workers", "0", "--style-augment", "strong"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "train_config.json").read_text())["train"]["augment"]
    assert {k: recorded[k] for k in STYLE_PRESETS["strong"]} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in STYLE_PRESETS["strong"].items()}
    assert json.loads((run / "metrics.json").read_text())["augment"] == recorded


def test_a_styled_run_resumes_on_the_uninterrupted_loss_curve_which_style_changes(shapes_data, tmp_path):
    def losses(run) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    common = {"data_mode": "cache", "checkpoint_every": 2, "eval_every": 0, "epochs": 2,
              "augment": AugmentConfig(**STYLE_PRESETS["strong"])}
    whole = train_run(shapes_data, tmp_path / "whole", "clip", max_steps=4, **common)
    part = train_run(shapes_data, tmp_path / "part", "clip", max_steps=2, **common)
    train_run(shapes_data, part, "clip", max_steps=4, **common)
    assert losses(part) == losses(whole)
    plain = train_run(shapes_data, tmp_path / "plain", "clip", max_steps=4, **{**common, "augment": AugmentConfig()})
    assert losses(plain)[0] != losses(whole)[0]
