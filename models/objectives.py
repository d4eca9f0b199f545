"""CFine's training objectives (docs/method.md §5): one pure function per loss, all computed in fp32, and the weighted
loss terms that CFine's head sums into the total loss.

Adding a loss takes two steps:
1. here, its function and a term registered with `@loss_term(name, weight, default)`: `term(inputs, weight)`
   returns the weighted part from the LossInputs (both modalities' features, identities, the CMPC classifier,
   the similarity S, the config); `name` keys CFineOutput.losses (the training log), `weight` names its weight
   and `default` is the weight's default; `needs=` (optional) says from the config whether the term is computed
   at all (an ablation switch that removes what it measures: its part is then 0);
2. in engine/settings.py, a row named like the weight, with that default and `loss_weight=True` (so that
   train.py has the flag and the config-file key; tests/test_engine_settings.py checks that the two agree).
train.py (engine/model_setup.py) passes every loss-weight setting into CFineConfig.loss_weights; checkpoints store
each weight under its name, and one written before a term existed loads with that term at its default weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from .precision import in_fp32

if TYPE_CHECKING:
    from .config import CFineConfig

CMPM_EPSILON = 1e-8


def _identity_mask(pids: torch.Tensor) -> torch.Tensor:
    """Y[i, j] = 1 where pid_i == pid_j, as floats (B, B)."""
    return (pids.unsqueeze(1) == pids.unsqueeze(0)).float()


def _projection_matching(logits: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """mean_i KL(softmax(logits_i) || target_i) with the unnormalised target of CMPM."""
    log_p = logits.log_softmax(dim=1)
    return (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()


@in_fp32
def cmpm_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 CMPM: KL(p || q) both ways, p = softmax_j(x_i . normalise(y_j)), q = Y / sqrt(row sum of Y)."""
    identity = _identity_mask(pids)
    # Faithful quirk: the mask is divided by its L2 norm (sqrt of the count), so q is not a distribution.
    log_target = torch.log(identity / identity.sum(dim=1, keepdim=True).sqrt() + CMPM_EPSILON)
    image_to_text = img @ F.normalize(txt, dim=-1).T
    text_to_image = txt @ F.normalize(img, dim=-1).T
    return _projection_matching(image_to_text, log_target) + _projection_matching(text_to_image, log_target)


@in_fp32
def cmpc_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 CMPC: cross-entropy of ((x . t) t) @ W (unit columns), t the other modality's unit vector, both ways.

    img, txt (B, D) give the scalar loss; (B, n, D) give the n per-feature losses in one pass over W.
    """
    single = img.dim() == 2
    if single:
        img, txt = img.unsqueeze(1), txt.unsqueeze(1)
    classifier = F.normalize(weight, dim=0)
    txt_unit, img_unit = F.normalize(txt, dim=-1), F.normalize(img, dim=-1)
    image_on_text = (img * txt_unit).sum(dim=-1, keepdim=True) * txt_unit
    text_on_image = (txt * img_unit).sum(dim=-1, keepdim=True) * img_unit
    logits = torch.stack([image_on_text, text_on_image], dim=2) @ classifier  # (B, n, 2, C)
    target = logits.gather(-1, pids.view(-1, 1, 1, 1).expand(*logits.shape[:-1], 1)).squeeze(-1)
    per_feature = (logits.logsumexp(dim=-1) - target).mean(dim=0).sum(dim=-1)  # batch mean, both directions
    return per_feature[0] if single else per_feature


@in_fp32
def diversity_loss(parts: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 diversity: mean_b ||X_b X_b^T - diag||_F / n^2 for the n unit part features X_b (B, n, D)."""
    unit = F.normalize(parts, dim=-1)
    gram = unit @ unit.transpose(1, 2)
    off_diagonal = gram - torch.diag_embed(gram.diagonal(dim1=1, dim2=2))
    return torch.linalg.matrix_norm(off_diagonal).mean() / parts.shape[1] ** 2


def _ranking_one_way(similarity: torch.Tensor, pids: torch.Tensor, margin: float) -> torch.Tensor:
    """Rows are anchors: hardest negative per anchor, counted only when it beats the positive; authors' fallback."""
    negatives = pids.unsqueeze(0) != pids.unsqueeze(1)  # negatives[i, j]: j is a negative of anchor i
    positive = similarity.diagonal()
    # argmax (first maximum, as NumPy's) then gather, so a tie sends the gradient to one index only.
    hardest = similarity.masked_fill(~negatives, float("-inf")).argmax(dim=1, keepdim=True)
    negative = similarity.gather(1, hardest).squeeze(1)
    counts = (negative > positive) & negatives.any(dim=1)
    loss = torch.where(counts, F.relu(margin - positive + negative), 0.0).sum()
    # Authors' fallback: with no counting anchor, one triplet of the last anchor and its first negative index.
    last = similarity.shape[0] - 1
    first_negative = negatives[last].int().argmax(dim=0, keepdim=True)  # (1,): a gather, not a host-read index
    fallback = F.relu(margin - positive[last] + similarity[last].gather(0, first_negative).squeeze(0))
    use_fallback = ~counts.any() & negatives[last].any()
    return loss + torch.where(use_fallback, fallback, 0.0)


@in_fp32
def ranking_loss(similarity: torch.Tensor, pids: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """docs/method.md §5 ranking: sum of relu(margin - S_ii + max_neg S_ij) over anchors whose hardest negative beats S_ii.

    Rows (image anchors) and columns (text anchors) both count; triplets are mined on the device, no NumPy.
    A batch with no negatives at all (one identity) has no triplet: the loss is 0 (the authors' code fails there).
    """
    return _ranking_one_way(similarity, pids, margin) + _ranking_one_way(similarity.T, pids, margin)


class LossInputs(NamedTuple):
    """What the loss terms see: features [global, lg1, lg2] (B, 3, D) ([global] (B, 1, D) with mgf off) of this
    process's batch and, with gather_features, of the global batch of all DDP ranks (models/gather.py); else the
    same tensors."""

    image: torch.Tensor
    text: torch.Tensor
    pids: torch.Tensor  # (B,)
    classifier: torch.Tensor  # CMPC's W, (D, C)
    all_image: torch.Tensor
    all_text: torch.Tensor
    all_pids: torch.Tensor
    similarity: Callable[[], torch.Tensor]  # docs/method.md §3-4 S on the global batch, computed when a term asks
    # (only when config.trains_similarity: otherwise the head selected no tokens for it)
    config: CFineConfig


def _always(config: CFineConfig) -> bool:
    return True


@dataclass(frozen=True)
class LossTerm:
    """One weighted part of the total loss: its name, its weight's name and default, term(inputs, weight), and
    needs(config): whether the term is computed at all (False: its part is 0, nothing computed)."""

    name: str
    weight: str
    default: float | tuple[float, ...]
    term: Callable[[LossInputs, Any], torch.Tensor]
    needs: Callable[[CFineConfig], bool] = _always


LOSS_TERMS: dict[str, LossTerm] = {}  # in the order they are summed


def loss_term(name: str, weight: str, default: float | tuple[float, ...],
              needs: Callable[[CFineConfig], bool] = _always) -> Callable:
    """Register the decorated term(inputs, weight) as a part of CFine's total loss, computed where needs(config)."""
    def register(term: Callable[[LossInputs, Any], torch.Tensor]) -> Callable[[LossInputs, Any], torch.Tensor]:
        if name in LOSS_TERMS or any(t.weight == weight for t in LOSS_TERMS.values()):
            raise ValueError(f"loss term {name!r} or its weight {weight!r} is registered already")
        LOSS_TERMS[name] = LossTerm(name, weight, default, term, needs)
        return term
    return register


def default_loss_weights() -> dict[str, float | tuple[float, ...]]:
    """Every registered term's weight at its default (the authors')."""
    return {t.weight: t.default for t in LOSS_TERMS.values()}


# Python-float weights: a weight tensor built per step would be a host-to-device copy every step.
@loss_term("cmpm", weight="cmpm_weights", default=(1.0, 1.0, 0.1))
def cmpm_term(inputs: LossInputs, weights: tuple[float, ...]) -> torch.Tensor:
    """docs/method.md §5: CMPM of the global, lg1 and lg2 features, weighted, on the global batch (mgf off: of
    the global feature alone, at the first weight)."""
    all_img, all_txt = inputs.all_image, inputs.all_text
    present = weights[:all_img.shape[1]]
    return sum(w * cmpm_loss(all_img[:, n], all_txt[:, n], inputs.all_pids) for n, w in enumerate(present))


@loss_term("cmpc", weight="cmpc_weights", default=(1.0, 1.0, 1.0))
def cmpc_term(inputs: LossInputs, weights: tuple[float, ...]) -> torch.Tensor:
    """docs/method.md §5: CMPC of the global, lg1 and lg2 features, weighted, on this process's batch (mgf off: of
    the global feature alone, at the first weight)."""
    parts = cmpc_loss(inputs.image, inputs.text, inputs.pids, inputs.classifier).unbind()
    return sum(w * part for w, part in zip(weights, parts))  # zip: as many weights as features


@loss_term("diversity", weight="diversity_weight", default=0.2, needs=lambda config: config.mgf)
def diversity_term(inputs: LossInputs, weight: float) -> torch.Tensor:
    """docs/method.md §5: diversity of the lg1 and lg2 features of each modality, weighted (mgf off: none to
    compare, not computed)."""
    return weight * (diversity_loss(inputs.image[:, 1:]) + diversity_loss(inputs.text[:, 1:]))


@loss_term("ranking", weight="ranking_weight", default=10.0, needs=lambda config: config.trains_similarity)
def ranking_term(inputs: LossInputs, weight: float) -> torch.Tensor:
    """docs/method.md §5: the ranking loss on S of the global batch (margin: config.margin), weighted; not computed
    at weight 0 (nor S, nor, with mgf off, the token selection S needs)."""
    return weight * ranking_loss(inputs.similarity(), inputs.all_pids, inputs.config.margin)
