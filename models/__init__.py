"""CFine modules and objectives (docs/method.md §2-7)."""
from .cfine import CFine, retrieval_features
from .config import CFineConfig
from .head import CFineHead, CFineOutput
from .objectives import cmpc_loss, cmpm_loss, diversity_loss, ranking_loss
from .optim import build_optimizer, epoch_lr_factor, parameter_groups
from .selection import select_tokens
from .similarity import cross_grained_similarity, fine_grained_similarity

__all__ = [
    "CFine",
    "CFineConfig",
    "CFineHead",
    "CFineOutput",
    "build_optimizer",
    "cmpc_loss",
    "cmpm_loss",
    "cross_grained_similarity",
    "diversity_loss",
    "epoch_lr_factor",
    "fine_grained_similarity",
    "parameter_groups",
    "ranking_loss",
    "retrieval_features",
    "select_tokens",
]
