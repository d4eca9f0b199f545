"""Epoch-seeded shuffling: the order of an epoch is a pure function of (seed, epoch), on every replica."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: a (seed, epoch) permutation, truncated to whole batches on every replica.

    The permutation's first `batches_per_epoch * batch_size * R` entries form global batches of
    batch_size * R; replica r takes the r-th contiguous slice of each, so replicas are disjoint, run the
    same number of batches (drop_last), and their batches concatenated in rank order are exactly one
    process's batches at batch_size * R (same samples, same order). The epoch travels with each index so the dataset's per-sample randomness
    (the flip) depends on (seed, epoch, index) only, whatever the worker count or persistence.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 42, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.batches_per_epoch = num_samples // (batch_size * num_replicas)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} training pairs are fewer than one batch of {batch_size} "
                             f"on each of {num_replicas} replica(s): lower the batch size")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; `start_batch` > 0 skips batches already done (resuming mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """This replica's sample order for `epoch` (all batches, before skipping)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        used = self.batches_per_epoch * self.batch_size * self.num_replicas
        per_batch = order[:used].reshape(self.batches_per_epoch, self.num_replicas, self.batch_size)
        return per_batch[:, self.rank].reshape(-1)

    def __iter__(self):
        epoch = self.epoch
        for index in self.permutation(epoch)[self.start_batch * self.batch_size:]:
            yield epoch, int(index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
