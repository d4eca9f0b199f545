"""CFine's head on encoder tokens: MGF + BN always; CFR, FCD and the weighted losses in training (docs/method.md §2-5)."""
from __future__ import annotations

import functools
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
    """Per-modality features [BN(global), BN(lg1), BN(lg2)] (B, 3, D); in training the loss and its weighted parts."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, by term: cmpm, cmpc, diversity, ranking


class Branch(NamedTuple):
    """One modality after MGF: BN features (B, 3, D), the raw global token (B, D) and the raw selected tokens."""

    features: torch.Tensor
    global_token: torch.Tensor
    selection: Selection


def global_branch(branch: Branch) -> Branch:
    """The branch over the global batch of all DDP ranks (gradient-preserving all-gather; identity alone)."""
    k = branch.selection.group1.shape[1]
    selected = gather_batch(branch.selection.selected)  # the groups are slices of it: one gather for three
    return Branch(gather_batch(branch.features), gather_batch(branch.global_token),
                  Selection(selected[:, :k], selected[:, k:], selected))


class CFineHead(nn.Module):
    """The shared MGF block, one BN bottleneck per modality and the CMPC classifier, on top of any encoder."""

    def __init__(self, config: CFineConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.mgf = ResidualCrossAttentionBlock(width, mgf_heads(width))
        self.image_bn = make_bottleneck(width)
        self.text_bn = make_bottleneck(width)
        self.classifier = CMPCClassifier(width, config.num_classes)
        self.text_encoder = text_encoder_class(config.text_encoder)  # a class: which text tokens MGF may select
        # train.py --gather_features: CMPM and the ranking loss see the global batch of all DDP ranks.
        self.gather_features = False

    def _branch(self, feats: TokenFeatures, bn: nn.BatchNorm1d, is_text: bool) -> Branch:
        tokens = feats.tokens
        batch, length, _ = tokens.shape
        scores = feats.global_attention
        if is_text:
            # The text encoder's rule: CLIP excludes SOT (0) and EOT; BERT keeps every position, [CLS] at score 0.
            candidates, scores = self.text_encoder.candidates(feats)
            padding = feats.padding_mask
            if padding is None:
                padding = text_padding_mask(feats.global_index, length)
            k = int(length * self.config.text_ratio)
        else:
            candidates = image_candidates(batch, length, tokens.device)
            padding = None
            k = int(length * self.config.image_ratio)
        global_token = tokens[torch.arange(batch, device=tokens.device), feats.global_index]
        selection = select_tokens(tokens, scores, k, candidates)
        groups = (selection.group1, selection.group2)
        local_global = local_global_features(self.mgf, global_token, groups, tokens, padding)
        features = apply_bottleneck(bn, torch.cat([global_token.unsqueeze(1), local_global], dim=1))
        return Branch(features, global_token, selection)

    def image_features(self, image: TokenFeatures) -> torch.Tensor:
        """docs/method.md §2 image features [BN(global), BN(lg1), BN(lg2)], (B, 3, D)."""
        return self._branch(image, self.image_bn, is_text=False).features

    def text_features(self, text: TokenFeatures) -> torch.Tensor:
        """docs/method.md §2 text features [BN(EOT), BN(lg1), BN(lg2)], (B, 3, D)."""
        return self._branch(text, self.text_bn, is_text=True).features

    def similarity(self, image: Branch, text: Branch) -> torch.Tensor:
        """docs/method.md §3-4 training similarity S = sim_cs + sim_cd on raw tokens, (B, B) images x texts."""
        config = self.config
        cross = cross_grained_similarity(
            image.global_token, image.selection.selected, text.global_token, text.selection.selected, config.tau_cs
        )
        fine = fine_grained_similarity(
            image.selection.group1, text.selection.group1, config.k_word, config.k_patch, config.tau_cd
        )
        return cross + fine

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
        return {name: term.term(inputs, weights[term.weight]) for name, term in LOSS_TERMS.items()}

    def forward(self, image: TokenFeatures, text: TokenFeatures, pids: torch.Tensor | None = None) -> CFineOutput:
        """Features of both modalities; with pids in training mode also the total loss and its parts."""
        image_branch = self._branch(image, self.image_bn, is_text=False)
        text_branch = self._branch(text, self.text_bn, is_text=True)
        output = CFineOutput(image_branch.features, text_branch.features)
        if self.training and pids is not None:
            parts = self.losses(image_branch, text_branch, pids)
            output.loss = sum(parts.values())
            output.losses = {name: value.detach() for name, value in parts.items()}
        return output
