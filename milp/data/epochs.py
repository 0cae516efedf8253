"""The order of a user's training examples over all its epochs.

Memory training draws a user's mini-batches for every epoch in one pass (several users
train side by side, each at its own epoch), yet each epoch must be the one a Lightning
fit of that user alone would draw from a shuffled DataLoader: same generator, same
draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShuffledEpochs(Sampler[list[int]]):
    """Mini-batches of `size` indices over `epochs` epochs, each epoch a fresh permutation
    of `n` drawn from `generator`; an epoch's last batch may be smaller.

    Epoch k is what a `DataLoader(shuffle=True, generator=generator)` iterated for the
    k-th time gives (a Lightning fit of `epochs` epochs): each such iteration first draws
    its workers' base seed from the generator, then the permutation, and where the last
    batch is partial, the sampler runs out (a `RandomSampler` draws one more, empty,
    slice of a permutation then).
    """

    def __init__(self, n: int, size: int, epochs: int | None, generator: torch.Generator) -> None:
        self.n, self.size, self.epochs, self.generator = n, size, epochs, generator

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless sampler has no length")
        return self.epochs * math.ceil(self.n / self.size)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = 0
        while self.n and (self.epochs is None or epoch < self.epochs):
            if epoch:  # the DataLoader draws the first epoch's base seed itself
                torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(self.n, generator=self.generator).tolist()
            for first in range(0, self.n, self.size):
                batch = order[first : first + self.size]
                if len(batch) < self.size:  # the sampler has run out before this batch
                    torch.randperm(self.n, generator=self.generator)
                yield batch
            epoch += 1
