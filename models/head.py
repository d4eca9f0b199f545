"""CFine's head on encoder tokens: MGF + BN at inference; CFR, FCD and the weighted losses in training (docs/method.md §2-5).

The ablation switches of CFineConfig (docs/method.md §5, ablation switches) remove a part here: mgf off builds no
MGF block (features [BN(global)] alone), cfr / fcd off leave their similarity out of S.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from clip.model import TokenFeatures

from .bottleneck import apply_bottleneck, make_bottleneck
from .classifier import CMPCClassifier
from .config import CFineConfig
from .gather import gather_batch
from .mgf import ResidualCrossAttentionBlock, local_global_features, mgf_heads
from .objectives import LOSS_TERMS, LossInputs
from .selection import Selection, image_candidates, select_tokens, text_padding_mask
from .similarity import cross_grained_similarity, fine_grained_similarity
from .text_encoders import text_encoder_class


@dataclass
class CFineOutput:
    """Per-modality features [BN(global), BN(lg1), BN(lg2)] (B, 3, D), [BN(global)] (B, 1, D) with mgf off; in
    training the loss and its weighted parts."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, by term: cmpm, cmpc, diversity, ranking


class Branch(NamedTuple):
    """One modality after MGF: BN features (B, n, D), the raw global token (B, D) and the raw selected tokens (None
    where nothing needs them: mgf off, and no S to train)."""

    features: torch.Tensor
    global_token: torch.Tensor
    selection: Selection | None


def global_branch(branch: Branch) -> Branch:
    """The branch over the global batch of all DDP ranks (gradient-preserving all-gather; identity alone)."""
    selection = branch.selection
    if selection is not None:
        k = selection.group1.shape[1]
        selected = gather_batch(selection.selected)  # the groups are slices of it: one gather for three
        selection = Selection(selected[:, :k], selected[:, k:], selected)
    return Branch(gather_batch(branch.features), gather_batch(branch.global_token), selection)


class CFineHead(nn.Module):
    """The shared MGF block (none with mgf off), one BN bottleneck per modality and the CMPC classifier, on top of
    any encoder."""

    def __init__(self, config: CFineConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.mgf = ResidualCrossAttentionBlock(width, mgf_heads(width)) if config.mgf else None
        self.image_bn = make_bottleneck(width)
        self.text_bn = make_bottleneck(width)
        self.classifier = CMPCClassifier(width, config.num_classes)
        self.text_encoder = text_encoder_class(config.text_encoder)  # a class: which text tokens MGF may select
        # train.py --gather_features: CMPM and the ranking loss see the global batch of all DDP ranks.
        self.gather_features = False

    def _candidates(self, feats: TokenFeatures, is_text: bool) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """docs/method.md §2 (§9 for BERT): the selection's candidate mask (B, N) and scores (B, N), its k, and the key
        padding mask of MGF's cross-attention (text; None for images)."""
        batch, length, _ = feats.tokens.shape
        if is_text:
            # The text encoder's rule: CLIP excludes SOT (0) and EOT; BERT keeps every position, [CLS] at score 0.
            candidates, scores = self.text_encoder.candidates(feats)
            padding = feats.padding_mask
            if padding is None:
                padding = text_padding_mask(feats.global_index, length)
            return candidates, scores, int(length * self.config.text_ratio), padding
        candidates = image_candidates(batch, length, feats.tokens.device)
        return candidates, feats.global_attention, int(length * self.config.image_ratio), None

    def _branch(self, feats: TokenFeatures, bn: nn.BatchNorm1d, is_text: bool, for_similarity: bool = False) -> Branch:
        """docs/method.md §2 for one modality: BN features [global, lg1, lg2] ([global] with mgf off) and the raw
        global token; tokens are selected where MGF or (for_similarity) S needs them."""
        # The order of the ops (candidates, global token, selection, MGF, the global token's unsqueeze) fixes the
        # order in which autograd sums the encoders' gradients: another order changes their last bits.
        tokens = feats.tokens
        selects = self.mgf is not None or for_similarity
        candidates, scores, k, padding = self._candidates(feats, is_text) if selects else (None, None, 0, None)
        global_token = tokens[torch.arange(tokens.shape[0], device=tokens.device), feats.global_index]
        selection = select_tokens(tokens, scores, k, candidates) if selects else None
        if self.mgf is None:
            return Branch(apply_bottleneck(bn, global_token.unsqueeze(1)), global_token, selection)
        groups = (selection.group1, selection.group2)
        local_global = local_global_features(self.mgf, global_token, groups, tokens, padding)
        features = apply_bottleneck(bn, torch.cat([global_token.unsqueeze(1), local_global], dim=1))
        return Branch(features, global_token, selection)

    def image_features(self, image: TokenFeatures) -> torch.Tensor:
        """docs/method.md §2 image features [BN(global), BN(lg1), BN(lg2)], (B, 3, D); mgf off: [BN(global)] (B, 1, D)."""
        return self._branch(image, self.image_bn, is_text=False).features

    def text_features(self, text: TokenFeatures) -> torch.Tensor:
        """docs/method.md §2 text features [BN(EOT), BN(lg1), BN(lg2)], (B, 3, D); mgf off: [BN(EOT)] (B, 1, D)."""
        return self._branch(text, self.text_bn, is_text=True).features

    def similarity(self, image: Branch, text: Branch) -> torch.Tensor:
        """docs/method.md §3-4 training similarity S = sim_cs + sim_cd on raw tokens, (B, B) images x texts; cfr off:
        S = sim_cd, fcd off: S = sim_cs (only the parts switched on are computed)."""
        config = self.config
        parts = []
        if config.cfr:
            parts.append(cross_grained_similarity(
                image.global_token, image.selection.selected, text.global_token, text.selection.selected, config.tau_cs
            ))
        if config.fcd:
            parts.append(fine_grained_similarity(
                image.selection.group1, text.selection.group1, config.k_word, config.k_patch, config.tau_cd
            ))
        return functools.reduce(operator.add, parts)

    def losses(self, image: Branch, text: Branch, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """docs/method.md §5 weighted parts: every term of models/objectives.py LOSS_TERMS at config.loss_weights.

        With gather_features, CMPM and ranking use the global batch of all ranks; CMPC and diversity are
        per-sample means and stay local (DDP's gradient average makes them global-batch means; models/gather.py).
        """
        if self.gather_features:
            all_image, all_text, all_pids = global_branch(image), global_branch(text), gather_batch(pids)
        else:
            all_image, all_text, all_pids = image, text, pids
        inputs = LossInputs(image.features, text.features, pids, self.classifier.weight, all_image.features,
                            all_text.features, all_pids, functools.partial(self.similarity, all_image, all_text),
                            self.config)
        weights = self.config.loss_weights
        # The part of a term its switch removed: a device zero (no host copy), made only for such a term.
        return {name: term.term(inputs, weights[term.weight]) if term.needs(self.config) else image.features.new_zeros(())
                for name, term in LOSS_TERMS.items()}

    def forward(self, image: TokenFeatures, text: TokenFeatures, pids: torch.Tensor | None = None) -> CFineOutput:
        """Features of both modalities; with pids in training mode also the total loss and its parts."""
        with_loss = self.training and pids is not None
        for_similarity = with_loss and self.config.trains_similarity
        image_branch = self._branch(image, self.image_bn, is_text=False, for_similarity=for_similarity)
        text_branch = self._branch(text, self.text_bn, is_text=True, for_similarity=for_similarity)
        output = CFineOutput(image_branch.features, text_branch.features)
        if with_loss:
            parts = self.losses(image_branch, text_branch, pids)
            output.loss = sum(parts.values())
            output.losses = {name: value.detach() for name, value in parts.items()}
        return output
