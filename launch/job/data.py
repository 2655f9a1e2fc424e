"""The data: scikit-learn's bundled digits (no download), and each rank's batch of a step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor  # with --label-noise of its labels replaced
    x_test: torch.Tensor
    y_test: torch.Tensor  # held out: never trained on, never noised, never used to choose


def load_data(seed: int, label_noise: float, device: torch.device) -> Data:
    """The digits, split 70/30 by a fixed permutation, standardised with training statistics.

    ``label_noise`` of the training labels are replaced by a random class drawn from
    ``seed``; the held-out labels are never touched.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(12345).permutation(len(y))  # fixed: the split never moves
    cut = int(0.7 * len(y))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1.0
    x = ((x - mean) / std).astype(np.float32)
    y_train = y[train].copy()
    rng = np.random.default_rng(seed)
    noisy = rng.random(len(y_train)) < label_noise
    y_train[noisy] = rng.integers(0, 10, int(noisy.sum()))

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return Data(t(x[train]), t(y_train), t(x[test]), t(y[test]))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """This rank's slice of the global batch at ``step``: a pure function of (seed, step)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    batch = order[i * batch_size : (i + 1) * batch_size]
    return batch.chunk(dist.get_world_size())[dist.get_rank()]
