"""The three objectives. Each loss returns a dict of named terms ending in `_loss`; the caller sums and logs them.

- CLIP (Radford et al. 2021, eq. in Fig. 3): symmetric InfoNCE over L2-normalised embeddings, learnable logit scale.
- nCLIP (Zhou et al. 2022, "Non-Contrastive Learning Meets Language-Image Pre-Training", Eq. 2-4): each tower's
  cluster distribution is the target of the other's prediction, plus λ_EH·H(p) (sharp per-sample distributions)
  − λ_HE·H(mean p) (all clusters used). Targets follow SwAV/DINO/MSN so the small-batch run does not collapse.
- xCLIP: L_clip + λ·L_nclip, in separate latent spaces (the model keeps the heads apart).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

BALANCING = ("sinkhorn", "center", "none")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100


@dataclasses.dataclass(frozen=True)
class NClipConfig:
    """Every nCLIP choice, with the reason for its default (measured on the emoji data, batch 256, K=1024)."""

    # Student (prediction) temperature: DINO's 0.1.
    student_temp: float = 0.1
    # Target temperature below the student's sharpens the targets (DINO 0.04, MSN 0.025); without sharpening the
    # cross-entropy is minimised by flat distributions.
    target_temp: float = 0.05
    # Targets carry no gradient (SwAV, DINO, MSN). With gradient, every sample fell into one prototype in <50 steps.
    stop_gradient: bool = True
    # How targets are balanced over the batch: Sinkhorn-Knopp equipartition (SwAV) works at any batch size and
    # keeps K/B large; "center" subtracts an EMA of the batch mean logits (DINO); "none" relies on λ_HE alone.
    balancing: str = "sinkhorn"
    # Sinkhorn-Knopp iterations; None: per objective (OBJECTIVE_DEFAULTS). SwAV's 3 for xCLIP. nCLIP alone, whose
    # label prompts are shared cluster targets, needs its targets held closer to equipartition: 10 (with λ_HE 1.5).
    sinkhorn_iters: int | None = None
    center_momentum: float = 0.9
    # λ_EH: weight of the mean per-sample entropy (sharpness). On the emoji val split (xCLIP, 30 epochs, batch 256)
    # 0.1 left 1.35 nats between the entropy of the mean and the mean entropy; 0.5 gave 2.1 nats. At batch 64,
    # 1.0 beat 0.5 on the test split (3 seeds, lr 1e-3): xCLIP R@1 13.4 vs 11.5, probe 42.1 vs 37.8, zero-shot equal
    # (22.5 vs 22.1), held-out gap 2.93 vs 2.31 nats; nCLIP alone gap 2.76 vs 1.85, 26.3% vs 21.5% of the
    # clusters in use (docs/BENCHMARKS.md as of commit 4ec5073).
    lambda_eh: float = 1.0
    # λ_HE: weight of the entropy of the batch-mean distribution (diversity); None: per objective. MSN's me-max
    # regulariser uses 1, as xCLIP does. nCLIP alone: 1.5 with 10 Sinkhorn iterations. On the emoji val split
    # (6 seeds, H100 sweep, bench/sweeps/prototypes-gpu.json) that used 19.8% of the prototypes on held-out images
    # against 16.0% at SwAV's 3 iterations and λ_HE 1 (17.9% with 10 iterations alone, 18.0% without image–label
    # mixing), at 2 points of zero-shot subcategory per emoji (33.4 vs 35.3, within the spread). On the test split
    # (3 seeds, CPU): 29.5% of the prototypes in use on held-out images against 24.3%, every seed over the quarter,
    # at 3.5 points of probe per emoji (37.9 vs 41.4) and 5 of image→text R@1 (docs/BENCHMARKS.md, objectives).
    lambda_he: float | None = None
    # λ of xCLIP: L = L_clip + weight · L_nclip.
    weight: float = 1.0
    # Image–label mixing (TrainConfig.label_prompt_prob) puts label prompts among the captions. One prompt is shared
    # by every image of its class, so as a target it pulls all of them into the same prototypes: on the emoji data
    # the prototypes in use on held-out images fell from 29.6 to 23.0% (xCLIP) and 27.5 to 24.3% (nCLIP). False: a
    # label prompt's distribution is no target for its image, which predicts only real captions' clusters, while
    # the prompt still learns to predict its image's. True: both directions. None (default; OBJECTIVE_DEFAULTS):
    # False for xCLIP, whose contrastive head carries the labels to zero-shot (test split, 3 seeds: 26.3% of the
    # prototypes in use on held-out images against 23.0%, every other metric within the spread), True for nCLIP,
    # whose clusters are its only channel (False cost it 11 points of zero-shot subcategory per emoji on val and
    # did not raise its prototype use: 16.0 vs 18.1%); nCLIP balances its targets harder instead (sinkhorn_iters,
    # lambda_he). docs/BENCHMARKS.md, objectives and sweep readings.
    prompt_targets: bool | None = None

    def __post_init__(self):
        if self.balancing not in BALANCING:
            raise ValueError(f"nclip.balancing must be one of {BALANCING}, got {self.balancing!r}")
        if self.student_temp <= 0 or self.target_temp <= 0:
            raise ValueError("nclip temperatures must be positive")
        if self.sinkhorn_iters is not None and self.sinkhorn_iters < 1:
            raise ValueError(f"nclip.sinkhorn_iters must be at least 1, got {self.sinkhorn_iters}")
        if self.lambda_he is not None and self.lambda_he < 0:
            raise ValueError(f"nclip.lambda_he must be >= 0, got {self.lambda_he}")

    def for_objective(self, objective: str) -> NClipConfig:
        """This config with every field left None set to `objective`'s default (OBJECTIVE_DEFAULTS)."""
        defaults = OBJECTIVE_DEFAULTS[objective]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


# The NClipConfig fields whose default depends on the objective (a None field takes its objective's value). xCLIP's
# contrastive head carries the labels to zero-shot; nCLIP alone carries them through its clusters, as shared
# targets, so it keeps prompts as targets and balances them harder (the fields' comments give the measurements).
OBJECTIVE_DEFAULTS = {
    "xclip": {"prompt_targets": False, "sinkhorn_iters": 3, "lambda_he": 1.0},
    "nclip": {"prompt_targets": True, "sinkhorn_iters": 10, "lambda_he": 1.5},
}


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              text_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE; row i of each side is the positive pair of row i of the other.

    With `text_keys` (one id per caption, equal ids = identical captions), every pair whose captions are identical
    is a positive, with the target mass shared equally among them (UniCL, Yang et al. 2022): a batch holding two
    images captioned "a flag emoji" no longer asks each image to reject the other's identical caption."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_emb @ text_emb.t()  # (B, B) image→text
    if text_keys is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return {"contrastive_loss": loss}
    positives = (text_keys[:, None] == text_keys[None, :]).float()  # symmetric, diagonal set
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    return {"contrastive_loss": loss}


@functools.cache
def _hash_weights(length: int) -> torch.Tensor:
    """Fixed random weights of the caption hash: the same in every step and on every rank."""
    return torch.randint(1, 2**62, (length,), generator=torch.Generator().manual_seed(0))


def caption_keys(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids → (B,) int64 ids equal exactly for identical token rows (a polynomial hash; rows that
    differ collide with probability ~B²/2⁶⁴)."""
    weights = _hash_weights(input_ids.shape[1])
    return (input_ids.long().cpu() * weights).sum(dim=1).to(input_ids.device)  # int64 wrap-around is the hash


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats along the last axis."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)


def sinkhorn(scores: torch.Tensor, iters: int) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp: (B, K) scores → assignments whose rows sum to 1 and whose clusters share mass equally.

    Differentiable; `NClipLoss.targets` detaches the result when `stop_gradient` is set."""
    q = torch.exp(scores.float() - scores.max().detach()).t()  # (K, B)
    q = q / q.sum()
    n_clusters, batch = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / n_clusters
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).t()


class NClipLoss(nn.Module):
    """Cross-modal cluster prediction with entropy regularisers; holds the DINO centres as buffers (checkpointed)."""

    def __init__(self, cfg: NClipConfig, num_clusters: int, objective: str = "nclip"):
        super().__init__()
        self.cfg = cfg.for_objective(objective)  # None fields take `objective`'s defaults
        self.register_buffer("image_center", torch.zeros(num_clusters))
        self.register_buffer("text_center", torch.zeros(num_clusters))

    def targets(self, logits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """(B, K) cosine logits → target distribution, balanced and sharpened as configured."""
        cfg = self.cfg
        if cfg.balancing == "sinkhorn":
            q = sinkhorn(logits / cfg.target_temp, cfg.sinkhorn_iters)
        elif cfg.balancing == "center":
            q = F.softmax((logits - center) / cfg.target_temp, dim=-1)
        else:
            q = F.softmax(logits / cfg.target_temp, dim=-1)
        return q.detach() if cfg.stop_gradient else q

    def forward(self, image_logits: torch.Tensor, text_logits: torch.Tensor,
                label_prompt: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`label_prompt` (B,) bool marks the pairs whose text is a label prompt (see `prompt_targets`)."""
        cfg = self.cfg
        log_p_image = F.log_softmax(image_logits / cfg.student_temp, dim=-1)  # (B, K) predictions
        log_p_text = F.log_softmax(text_logits / cfg.student_temp, dim=-1)
        q_image = self.targets(image_logits, self.image_center)
        q_text = self.targets(text_logits, self.text_center)
        image_ce = -(q_text * log_p_image).sum(-1)  # (B,) each image predicts its text's clusters
        if label_prompt is not None and not cfg.prompt_targets:
            keep = ~label_prompt.bool()
            image_term = (image_ce * keep).sum() / keep.sum().clamp_min(1)
        else:
            image_term = image_ce.mean()
        cross = (image_term - (q_image * log_p_text).sum(-1).mean()) / 2
        p_image, p_text = log_p_image.exp(), log_p_text.exp()
        mean_entropy = (entropy(p_image).mean() + entropy(p_text).mean()) / 2
        entropy_of_mean = (entropy(p_image.mean(0)) + entropy(p_text.mean(0))) / 2
        if self.training and cfg.balancing == "center":
            self._update_centers(image_logits, text_logits)
        return {
            "cross_modal_loss": cfg.weight * cross,
            "sharpness_loss": cfg.weight * cfg.lambda_eh * mean_entropy,
            "diversity_loss": -cfg.weight * cfg.lambda_he * entropy_of_mean,
        }

    @torch.no_grad()
    def _update_centers(self, image_logits: torch.Tensor, text_logits: torch.Tensor) -> None:
        m = self.cfg.center_momentum
        self.image_center.mul_(m).add_(image_logits.float().mean(0), alpha=1 - m)
        self.text_center.mul_(m).add_(text_logits.float().mean(0), alpha=1 - m)


class ObjectiveLoss(nn.Module):
    """The configured objective over a model's `forward` outputs (already gathered across ranks)."""

    def __init__(self, objective: str, nclip: NClipConfig, num_clusters: int, multi_positive: bool = False):
        super().__init__()
        if objective not in ("clip", "nclip", "xclip"):
            raise ValueError(f"objective must be clip, nclip or xclip, got {objective!r}")
        self.objective, self.multi_positive = objective, multi_positive
        self.nclip = NClipLoss(nclip, num_clusters, objective) if objective in ("nclip", "xclip") else None

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.objective in ("clip", "xclip"):
            keys = out.get("text_key") if self.multi_positive else None
            terms.update(clip_loss(out["image_embedding"], out["text_embedding"], out["logit_scale"], keys))
        if self.nclip is not None:
            terms.update(self.nclip(out["image_cluster_logits"].float(), out["text_cluster_logits"].float(),
                                    out.get("label_prompt")))
        return terms


@torch.no_grad()
def collapse_indicators(cluster_logits: torch.Tensor, temp: float) -> dict[str, float]:
    """Per-batch collapse signs: prototypes that are some sample's argmax, mean entropy, entropy of the mean."""
    probs = F.softmax(cluster_logits.float() / temp, dim=-1)
    return {
        "clusters_used": float(probs.argmax(-1).unique().numel()),
        "mean_entropy": float(entropy(probs).mean()),
        "entropy_of_mean": float(entropy(probs.mean(0))),
    }
