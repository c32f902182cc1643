"""Tests for the CLIP / nCLIP / xCLIP losses against hand-computed values on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import (
    NClipConfig,
    NClipLoss,
    ObjectiveLoss,
    caption_keys,
    clip_loss,
    collapse_indicators,
    entropy,
    sinkhorn,
)
from training.model import create_model

EYE2 = [[1.0, 0.0], [0.0, 1.0]]


def softplus(x: float) -> float:
    """log(1 + e^x): the cross-entropy of a two-way softmax whose wrong logit leads the right one by x."""
    return math.log1p(math.exp(x))


def reference_clip_loss(cosines: np.ndarray, scale: float) -> float:
    """Symmetric cross-entropy over a (B, B) cosine matrix, written out row by row and column by column."""
    logits = scale * np.asarray(cosines, dtype=np.float64)
    n = len(logits)
    rows = [-logits[i, i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(n)]
    cols = [-logits[j, j] + math.log(sum(math.exp(v) for v in logits[:, j])) for j in range(n)]
    return (sum(rows) / n + sum(cols) / n) / 2


def clip_value(image, text, logit_scale: float) -> float:
    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    return clip_loss(t(image), t(text), t(logit_scale))["contrastive_loss"].item()


# ---------------------------------------------------------------------------------------------------- clip_loss


@pytest.mark.parametrize(
    "image, text, scale, expected",
    [
        # orthonormal pairs: each direction is log(1 + e^{-s})
        (EYE2, EYE2, 10.0, softplus(-10.0)),
        (EYE2, EYE2, 1.0, softplus(-1.0)),
        # cosines [[1, .6], [0, .8]]: rows lead by 4 and 8, columns by 10 and 2 (at s = 10)
        (EYE2, [[1.0, 0.0], [0.6, 0.8]], 10.0,
         ((softplus(-4) + softplus(-8)) / 2 + (softplus(-10) + softplus(-2)) / 2) / 2),
        # swapped pairs: every wrong logit leads the right one by s
        (EYE2, [[0.0, 1.0], [1.0, 0.0]], 10.0, softplus(10.0)),
    ],
)
def test_clip_loss_hand_values(image, text, scale, expected):
    assert clip_value(image, text, math.log(scale)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_clip_loss_matches_reference_on_3x2_embeddings(scale):
    angles_image, angles_text = np.array([0.0, 1.0, 2.5]), np.array([0.3, 1.2, 2.0])
    image = np.stack([np.cos(angles_image), np.sin(angles_image)], 1)
    text = np.stack([np.cos(angles_text), np.sin(angles_text)], 1)
    cosines = np.cos(angles_image[:, None] - angles_text[None, :])
    expected = reference_clip_loss(cosines, scale)
    assert clip_value(image.tolist(), text.tolist(), math.log(scale)) == pytest.approx(expected, rel=1e-5)


def test_clip_loss_is_invariant_to_embedding_norm():
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    scale = torch.tensor(math.log(10.0))
    base = clip_loss(image, text, scale)["contrastive_loss"]
    rescaled = clip_loss(image * torch.tensor([[0.1], [3.0], [50.0]]), text * 7.0, scale)["contrastive_loss"]
    torch.testing.assert_close(rescaled, base)


def test_clip_loss_clamps_scale_at_100():
    image, text = EYE2, [[1.0, 0.0], [0.6, 0.8]]
    at_cap = clip_value(image, text, math.log(100.0))
    assert clip_value(image, text, math.log(1000.0)) == pytest.approx(at_cap, rel=1e-6)
    assert at_cap == pytest.approx(reference_clip_loss([[1.0, 0.6], [0.0, 0.8]], 100.0), rel=1e-5)
    assert clip_value(image, text, math.log(50.0)) != pytest.approx(at_cap, rel=1e-3)  # below the cap it matters


def test_multi_positive_with_distinct_captions_is_plain_infonce():
    image, text = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), torch.randn(5, 8)
    scale, keys = torch.tensor(2.0), torch.arange(5)
    plain = clip_loss(image, text, scale)["contrastive_loss"]
    torch.testing.assert_close(clip_loss(image, text, scale, keys)["contrastive_loss"], plain)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_multi_positive_shares_the_target_between_identical_captions(scale):
    """Two images, one caption text twice: each row's target is (½, ½), so with orthonormal pairs each
    direction costs ½·log(1 + e^{-s}) + ½·log(1 + e^{s}); plain InfoNCE would charge only the first."""
    keys = torch.tensor([7, 7])
    value = clip_loss(torch.eye(2), torch.eye(2), torch.tensor(math.log(scale)), keys)["contrastive_loss"].item()
    assert value == pytest.approx((softplus(-scale) + softplus(scale)) / 2, rel=1e-6)
    # the loss is lowest when both images sit on the shared caption, not when each rejects the other's copy
    together = clip_loss(torch.ones(2, 2), torch.ones(2, 2), torch.tensor(math.log(scale)), keys)
    assert together["contrastive_loss"].item() < value


def test_caption_keys_are_equal_exactly_for_identical_token_rows():
    ids = torch.tensor([[1, 5, 9, 2, 0], [1, 5, 9, 2, 0], [1, 9, 5, 2, 0], [1, 5, 9, 2, 2]])
    keys = caption_keys(ids)
    assert keys[0] == keys[1]
    assert len(set(keys[1:].tolist())) == 3  # order and padding count
    assert torch.equal(caption_keys(ids), keys)  # the same on every call (and every rank)


def test_clip_loss_aligned_pairs_near_zero_swapped_pairs_large():
    image = torch.eye(3)
    aligned = clip_loss(image, 2 * image, torch.tensor(math.log(100.0)))["contrastive_loss"].item()
    swapped = clip_loss(image, image[[1, 2, 0]], torch.tensor(math.log(100.0)))["contrastive_loss"].item()
    assert aligned < 1e-6
    assert swapped == pytest.approx(100.0, rel=1e-3)  # each wrong logit leads the right one by s = 100


# ---------------------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize(
    "probs, expected",
    [
        ([0.25] * 4, math.log(4)),
        ([1 / 7] * 7, math.log(7)),
        ([0.0, 1.0, 0.0], 0.0),
        ([0.5, 0.25, 0.25], 1.5 * math.log(2)),
    ],
)
def test_entropy_hand_values(probs, expected):
    assert entropy(torch.tensor(probs, dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-9)


def test_entropy_is_per_row():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(entropy(probs), torch.tensor([math.log(2), 0.0]))


# ---------------------------------------------------------------------------------------------------- sinkhorn

# x / (1 - x) = sqrt(3): the doubly stochastic scaling of [[1, 1], [1, 3]] keeps the cross ratio 3
X = math.sqrt(3) / (1 + math.sqrt(3))


@pytest.mark.parametrize(
    "weights, iters, expected",
    [
        # already balanced (rows and clusters each sum to 1): a fixed point after one iteration
        ([[1.0, 2.0], [2.0, 1.0]], 1, [[1 / 3, 2 / 3], [2 / 3, 1 / 3]]),
        # the same with cluster 1 favoured ×5 by every sample: balancing removes the favouritism exactly
        ([[1.0, 10.0], [2.0, 5.0]], 1, [[1 / 3, 2 / 3], [2 / 3, 1 / 3]]),
        # converges to the doubly stochastic matrix with the same cross ratio
        ([[1.0, 1.0], [1.0, 3.0]], 50, [[X, 1 - X], [1 - X, X]]),
        # uniform scores → uniform assignments
        ([[1.0] * 4] * 2, 3, [[0.25] * 4] * 2),
    ],
)
def test_sinkhorn_hand_values(weights, iters, expected):
    scores = torch.tensor(weights, dtype=torch.float64).log()
    torch.testing.assert_close(sinkhorn(scores, iters).double(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("batch, clusters", [(8, 4), (4, 8), (6, 3)])
def test_sinkhorn_rows_are_distributions_and_clusters_share_mass(batch, clusters):
    scores = torch.randn(batch, clusters, generator=torch.Generator().manual_seed(batch * clusters))
    q = sinkhorn(scores, iters=3)
    assert q.shape == (batch, clusters) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(batch))  # exact after the final column step
    converged = sinkhorn(scores, iters=200)
    torch.testing.assert_close(converged.sum(0), torch.full((clusters,), batch / clusters), atol=1e-4, rtol=0)


def test_sinkhorn_removes_a_favoured_cluster_at_every_step():
    scores = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    favoured = scores + torch.tensor([[4.0, 0.0, -2.0]])  # a per-cluster offset shared by every sample
    for iters in (1, 2, 3):
        torch.testing.assert_close(sinkhorn(favoured, iters), sinkhorn(scores, iters))


def test_sinkhorn_converges_regardless_of_per_sample_offsets():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 3, generator=gen)
    shifted = scores + torch.randn(5, 1, generator=gen)
    torch.testing.assert_close(sinkhorn(shifted, 200), sinkhorn(scores, 200))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_sinkhorn_targets_carry_gradient_only_without_stop_gradient(stop_gradient):
    logits = torch.randn(4, 3, requires_grad=True)
    loss = NClipLoss(NClipConfig(balancing="sinkhorn", stop_gradient=stop_gradient), 3)
    q = loss.targets(logits, loss.image_center)
    assert q.requires_grad is not stop_gradient


# ---------------------------------------------------------------------------------------------------- NClipLoss

IMAGE_LOGITS = [[0.9, 0.1, -0.3], [0.2, 0.7, 0.0]]  # (B=2, K=3) cosines
TEXT_LOGITS = [[0.5, -0.2, 0.4], [-0.1, 0.3, 0.8]]


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(-1)


def reference_nclip(image, text, cfg: NClipConfig, center_image=0.0, center_text=0.0,
                    label_prompt=None) -> dict[str, float]:
    """nCLIP Eq. 2-4 in numpy: cross-modal prediction of sharpened targets, λ_EH·H(p), −λ_HE·H(mean p); images
    whose text is a label prompt (`label_prompt`) predict nothing unless `prompt_targets`."""
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    p_image, p_text = np_softmax(image / cfg.student_temp), np_softmax(text / cfg.student_temp)
    q_image = np_softmax((image - center_image) / cfg.target_temp)
    q_text = np_softmax((text - center_text) / cfg.target_temp)
    masked = label_prompt is not None and cfg.prompt_targets is False
    predicting = ~np.asarray(label_prompt) if masked else np.ones(len(image), bool)
    image_ce = -(q_text * np.log(p_image)).sum(-1)[predicting]
    cross = ((image_ce.mean() if len(image_ce) else 0.0) - (q_image * np.log(p_text)).sum(-1).mean()) / 2
    sharp = (np_entropy(p_image).mean() + np_entropy(p_text).mean()) / 2
    diverse = (np_entropy(p_image.mean(0)) + np_entropy(p_text.mean(0))) / 2
    return {
        "cross_modal_loss": cfg.weight * cross,
        "sharpness_loss": cfg.weight * cfg.lambda_eh * sharp,
        "diversity_loss": -cfg.weight * cfg.lambda_he * diverse,
    }


def nclip_terms(cfg: NClipConfig, image=IMAGE_LOGITS, text=TEXT_LOGITS, train: bool = True,
                label_prompt=None) -> dict[str, float]:
    loss = NClipLoss(cfg, num_clusters=len(image[0])).train(train)
    mask = None if label_prompt is None else torch.tensor(label_prompt)
    out = loss(torch.tensor(image, dtype=torch.float64), torch.tensor(text, dtype=torch.float64), mask)
    return {k: v.item() for k, v in out.items()}


def check_nclip(cfg: NClipConfig, image=IMAGE_LOGITS, text=TEXT_LOGITS, label_prompt=None):
    got = nclip_terms(cfg, image, text, label_prompt=label_prompt)
    expected = reference_nclip(image, text, cfg.for_objective("nclip"), label_prompt=label_prompt)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key


@pytest.mark.parametrize(
    "cfg",
    [
        NClipConfig(balancing="none"),
        NClipConfig(balancing="none", student_temp=0.5, target_temp=0.25),
        NClipConfig(balancing="none", student_temp=1.0, target_temp=1.0, lambda_eh=0.3, lambda_he=0.7),
        NClipConfig(balancing="none", weight=2.5),
        NClipConfig(balancing="none", stop_gradient=False),  # same values, only the gradient differs
    ],
)
def test_nclip_matches_reference(cfg):
    check_nclip(cfg)


@pytest.mark.parametrize("prompt_targets", [False, True, None])
@pytest.mark.parametrize("label_prompt", [[True, False], [False, False], [True, True]])
def test_nclip_with_label_prompts_matches_reference(label_prompt, prompt_targets):
    check_nclip(NClipConfig(balancing="none", prompt_targets=prompt_targets), label_prompt=label_prompt)


def test_an_image_whose_text_is_a_label_prompt_is_not_pulled_to_the_prompts_clusters():
    """The prompt still learns to predict its image's clusters; the image gets no gradient from the prompt."""
    image = torch.tensor(IMAGE_LOGITS, dtype=torch.float64, requires_grad=True)
    text = torch.tensor(TEXT_LOGITS, dtype=torch.float64, requires_grad=True)
    loss = NClipLoss(NClipConfig(balancing="sinkhorn", lambda_eh=0.0, lambda_he=0.0, prompt_targets=False), 3)
    loss(image, text, torch.tensor([True, False]))["cross_modal_loss"].backward()
    assert torch.all(image.grad[0] == 0) and torch.any(image.grad[1] != 0)
    assert torch.any(text.grad[0] != 0) and torch.any(text.grad[1] != 0)
    image.grad, text.grad = None, None
    both = NClipLoss(NClipConfig(balancing="sinkhorn", lambda_eh=0.0, lambda_he=0.0, prompt_targets=True), 3)
    both(image, text, torch.tensor([True, False]))["cross_modal_loss"].backward()
    assert torch.any(image.grad[0] != 0)  # as a target, the prompt pulls its image


def test_by_default_only_xclip_keeps_label_prompts_out_of_its_image_targets():
    chosen = {o: ObjectiveLoss(o, NClipConfig(), 3).nclip.cfg.prompt_targets for o in ("xclip", "nclip")}
    assert chosen == {"xclip": False, "nclip": True}
    assert ObjectiveLoss("xclip", NClipConfig(prompt_targets=True), 3).nclip.cfg.prompt_targets is True


def test_nclip_alone_balances_its_targets_harder_by_default_and_set_values_win():
    chosen = {o: ObjectiveLoss(o, NClipConfig(), 3).nclip.cfg for o in ("xclip", "nclip")}
    assert (chosen["xclip"].sinkhorn_iters, chosen["xclip"].lambda_he) == (3, 1.0)
    assert (chosen["nclip"].sinkhorn_iters, chosen["nclip"].lambda_he) == (10, 1.5)
    forced = ObjectiveLoss("nclip", NClipConfig(sinkhorn_iters=3, lambda_he=1.0), 3).nclip.cfg
    assert (forced.sinkhorn_iters, forced.lambda_he) == (3, 1.0)
    # the diversity term uses the resolved weight: λ_HE 1.5 for nCLIP alone, 1 for xCLIP's head
    image, text = torch.tensor(IMAGE_LOGITS), torch.tensor(TEXT_LOGITS)
    ratio = (NClipLoss(NClipConfig(), 3, "nclip")(image, text)["diversity_loss"]
             / NClipLoss(NClipConfig(), 3, "xclip")(image, text)["diversity_loss"])
    assert ratio.item() == pytest.approx(1.5)


def test_more_sinkhorn_iterations_bring_the_targets_closer_to_equipartition():
    scores = torch.tensor([[4.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0]])
    imbalance = [(sinkhorn(scores, iters).sum(0) - 3 / 4).abs().max().item() for iters in (1, 3, 10)]
    assert imbalance[0] > imbalance[1] > imbalance[2]


@pytest.mark.parametrize("bad", [{"sinkhorn_iters": 0}, {"lambda_he": -1.0}])
def test_nclip_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        NClipConfig(**bad)


def test_nclip_uniform_logits_give_log_k():
    """All-equal logits: p and q uniform, so cross = log K, H(p) = H(mean p) = log K."""
    cfg = NClipConfig(balancing="none", lambda_eh=0.1, lambda_he=1.0)
    zeros = [[0.0] * 3] * 2
    terms = nclip_terms(cfg, zeros, zeros)
    assert terms == pytest.approx(
        {"cross_modal_loss": math.log(3), "sharpness_loss": 0.1 * math.log(3), "diversity_loss": -math.log(3)}
    )


@pytest.mark.parametrize(
    "change, factors",
    [
        ({"weight": 3.0}, {"cross_modal_loss": 3.0, "sharpness_loss": 3.0, "diversity_loss": 3.0}),
        ({"lambda_eh": 0.4}, {"cross_modal_loss": 1.0, "sharpness_loss": 4.0, "diversity_loss": 1.0}),
        ({"lambda_he": 0.5}, {"cross_modal_loss": 1.0, "sharpness_loss": 1.0, "diversity_loss": 0.5}),
        ({"lambda_eh": 0.0}, {"cross_modal_loss": 1.0, "sharpness_loss": 0.0, "diversity_loss": 1.0}),
    ],
)
def test_nclip_weights_scale_their_terms(change, factors):
    base_cfg = NClipConfig(balancing="none", lambda_eh=0.1, lambda_he=1.0, weight=1.0)
    base = nclip_terms(base_cfg)
    changed = nclip_terms(NClipConfig(**{**base_cfg.__dict__, **change}))
    assert changed == pytest.approx({k: factors[k] * v for k, v in base.items()}, rel=1e-9)


def cross_modal_text_grad(stop_gradient: bool) -> torch.Tensor:
    cfg = NClipConfig(balancing="none", stop_gradient=stop_gradient)
    image = torch.tensor(IMAGE_LOGITS, dtype=torch.float64, requires_grad=True)
    text = torch.tensor(TEXT_LOGITS, dtype=torch.float64, requires_grad=True)
    NClipLoss(cfg, 3)(image, text)["cross_modal_loss"].backward()
    return text.grad


def test_stop_gradient_text_grad_is_prediction_side_only():
    """With targets detached, ∂cross/∂z_text = (p_text − q_image) / (2·B·τ_student): the softmax-CE gradient."""
    cfg = NClipConfig(balancing="none")
    image, text = np.array(IMAGE_LOGITS), np.array(TEXT_LOGITS)
    p_text, q_image = np_softmax(text / cfg.student_temp), np_softmax(image / cfg.target_temp)
    expected = (p_text - q_image) / (2 * len(text) * cfg.student_temp)
    np.testing.assert_allclose(cross_modal_text_grad(stop_gradient=True).numpy(), expected, rtol=1e-9)


def test_without_stop_gradient_targets_get_gradient_too():
    with_targets = cross_modal_text_grad(stop_gradient=False)
    assert not torch.allclose(with_targets, cross_modal_text_grad(stop_gradient=True), atol=1e-3)


def test_center_buffers_follow_ema_in_train_mode_only():
    cfg = NClipConfig(balancing="center", center_momentum=0.9)
    loss = NClipLoss(cfg, 3).train()
    image, text = torch.tensor(IMAGE_LOGITS), torch.tensor(TEXT_LOGITS)
    loss(image, text)
    mean_image, mean_text = image.mean(0), text.mean(0)
    torch.testing.assert_close(loss.image_center, 0.1 * mean_image)  # from zeros: (1 − m)·mean
    torch.testing.assert_close(loss.text_center, 0.1 * mean_text)
    loss(2 * image, 2 * text)
    torch.testing.assert_close(loss.image_center, 0.9 * 0.1 * mean_image + 0.1 * 2 * mean_image)
    torch.testing.assert_close(loss.text_center, 0.9 * 0.1 * mean_text + 0.1 * 2 * mean_text)
    before = loss.image_center.clone(), loss.text_center.clone()
    loss.eval()(image + 5, text - 5)
    torch.testing.assert_close((loss.image_center, loss.text_center), before)


@pytest.mark.parametrize("balancing", ["none", "sinkhorn"])
def test_centers_move_only_with_center_balancing(balancing):
    loss = NClipLoss(NClipConfig(balancing=balancing), 3).train()
    loss(torch.tensor(IMAGE_LOGITS), torch.tensor(TEXT_LOGITS))
    assert not loss.image_center.any() and not loss.text_center.any()


def test_center_balancing_subtracts_center_from_targets():
    cfg = NClipConfig(balancing="center")
    loss = NClipLoss(cfg, 3).eval()
    center_image, center_text = np.array([0.5, 0.0, -0.5]), np.array([0.0, 0.2, 0.1])
    loss.image_center.copy_(torch.tensor(center_image))
    loss.text_center.copy_(torch.tensor(center_text))
    got = loss(torch.tensor(IMAGE_LOGITS), torch.tensor(TEXT_LOGITS))
    expected = reference_nclip(IMAGE_LOGITS, TEXT_LOGITS, loss.cfg, center_image, center_text)
    assert {k: v.item() for k, v in got.items()} == pytest.approx(expected, rel=1e-5)


def test_collapsed_batch_is_penalised_by_diversity():
    cfg = NClipConfig(balancing="none", lambda_he=1.0)
    collapsed = [[1.0, 0.0, 0.0]] * 3  # every sample in cluster 0
    spread = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # same per-sample sharpness, all clusters used
    collapsed_terms, spread_terms = nclip_terms(cfg, collapsed, collapsed), nclip_terms(cfg, spread, spread)
    assert collapsed_terms["diversity_loss"] > spread_terms["diversity_loss"] + 0.5
    assert spread_terms["diversity_loss"] == pytest.approx(-math.log(3))  # mean of a permutation is uniform
    assert collapsed_terms["sharpness_loss"] == pytest.approx(spread_terms["sharpness_loss"])


def test_flat_rows_are_penalised_by_sharpness():
    cfg = NClipConfig(balancing="none")
    flat = [[0.0, 0.01, 0.0], [0.01, 0.0, 0.0]]
    peaked = [[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]]
    assert nclip_terms(cfg, flat, flat)["sharpness_loss"] > nclip_terms(cfg, peaked, peaked)["sharpness_loss"] + 0.05


def test_invalid_nclip_config_is_rejected():
    with pytest.raises(ValueError, match="balancing"):
        NClipConfig(balancing="whitening")
    with pytest.raises(ValueError, match="temperatures"):
        NClipConfig(target_temp=0.0)


# ---------------------------------------------------------------------------------------------------- ObjectiveLoss

NCLIP_TERMS = {"cross_modal_loss", "sharpness_loss", "diversity_loss"}


def fake_outputs(batch: int = 3, dim: int = 4, clusters: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {
        "image_embedding": torch.randn(batch, dim, generator=gen),
        "text_embedding": torch.randn(batch, dim, generator=gen),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "image_cluster_logits": torch.randn(batch, clusters, generator=gen),
        "text_cluster_logits": torch.randn(batch, clusters, generator=gen),
    }


@pytest.mark.parametrize(
    "objective, expected",
    [("clip", {"contrastive_loss"}), ("nclip", NCLIP_TERMS), ("xclip", NCLIP_TERMS | {"contrastive_loss"})],
)
def test_objective_terms(objective, expected):
    terms = ObjectiveLoss(objective, NClipConfig(), num_clusters=5)(fake_outputs())
    assert set(terms) == expected
    assert all(key.endswith("_loss") and value.ndim == 0 for key, value in terms.items())


def test_xclip_terms_are_clip_plus_weighted_nclip():
    out, cfg = fake_outputs(), NClipConfig(balancing="none", weight=0.5)
    terms = ObjectiveLoss("xclip", cfg, num_clusters=5)(out)
    torch.testing.assert_close(
        terms["contrastive_loss"],
        clip_loss(out["image_embedding"], out["text_embedding"], out["logit_scale"])["contrastive_loss"],
    )
    expected = reference_nclip(out["image_cluster_logits"].numpy(), out["text_cluster_logits"].numpy(),
                               cfg.for_objective("xclip"))
    assert {k: terms[k].item() for k in NCLIP_TERMS} == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- collapse_indicators


@pytest.mark.parametrize(
    "logits, temp, expected",
    [
        # every row has argmax 1
        ([[0.0, 2.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.9, 0.8]], 1.0, {"clusters_used": 1.0}),
        # distinct argmaxes
        ([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]], 1.0, {"clusters_used": 3.0}),
        # flat rows: H(p) = H(mean p) = log K
        ([[0.0] * 4] * 2, 0.1, {"mean_entropy": math.log(4), "entropy_of_mean": math.log(4)}),
        # one row, probabilities [1/4, 3/4]
        ([[0.0, math.log(3)]], 1.0,
         {"clusters_used": 1.0, "mean_entropy": -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))}),
        # temperature sharpens: the same row at temp 1/2 has probabilities [1/10, 9/10]
        ([[0.0, math.log(3)]], 0.5, {"mean_entropy": -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))}),
        # near one-hot rows on 3 distinct clusters: H(p) ≈ 0, H(mean p) ≈ log 3
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], 0.01,
         {"clusters_used": 3.0, "mean_entropy": 0.0, "entropy_of_mean": math.log(3)}),
    ],
)
def test_collapse_indicators(logits, temp, expected):
    got = collapse_indicators(torch.tensor(logits), temp)
    assert set(got) == {"clusters_used", "mean_entropy", "entropy_of_mean"}
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- through the model


def tiny_batch(batch: int = 4, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(batch, 3, 16, 16, generator=gen)
    input_ids = torch.randint(3, 512, (batch, length), generator=gen)
    input_ids[torch.arange(batch), torch.tensor([5, 15, 9, 2])] = 2  # one </s> per row, at varied positions
    return pixels, input_ids


@pytest.mark.parametrize(
    "objective, heads",
    [
        ("clip", {"image_proj", "text_proj", "logit_scale"}),
        ("nclip", {"image_head", "text_head"}),
        ("xclip", {"image_proj", "text_proj", "logit_scale", "image_head", "text_head"}),
    ],
)
def test_gradients_reach_every_parameter_of_both_towers(objective, heads):
    torch.manual_seed(0)
    model = create_model("tiny", objective=objective)
    cfg = model.config
    loss_fn = ObjectiveLoss(objective, NClipConfig(), cfg.cluster_head.num_clusters)
    sum(loss_fn(model(*tiny_batch())).values()).backward()
    params = dict(model.named_parameters())
    assert {name.split(".")[0] for name in params} == {"visual", "text"} | heads
    if "image_head" in heads:
        assert {"image_head.prototypes", "text_head.prototypes"} <= params.keys()
    no_grad = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
