"""Statistics of the model's first input batches, read while watching (per feature)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: How many of the first counted forwards contribute input statistics.
INPUT_BATCHES = 4


@dataclass
class InputFacts:
    """Statistics of the first input batches, per feature (last dim; channels for images)."""

    batches: int
    samples: int
    features: int
    mean: float
    std: float
    negative_share: float  # share of all input values that are < 0
    mostly_negative_features: float  # share of features negative in >= 99% of samples
    feature_mean_min: float
    feature_mean_max: float
    feature_std_min: float
    feature_std_max: float


class InputStats:
    """Accumulates per-feature statistics of the first ``INPUT_BATCHES`` model inputs."""

    def __init__(self) -> None:
        self.batches = 0
        self.samples = 0
        self.features = 0
        self._sums: torch.Tensor | None = None  # per feature: n, sum, sum of squares, negatives
        self._negative_rows: torch.Tensor | None = None

    @property
    def wanted(self) -> bool:
        return self.batches < INPUT_BATCHES

    def add(self, x: Any) -> None:
        """Count one input batch (ignored unless it is a floating tensor of rank >= 2)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return
        with torch.no_grad():
            x = x.detach().float()
            feature_dim = 1 if x.dim() >= 4 else x.dim() - 1
            per_feature = x.movedim(feature_dim, -1).reshape(-1, x.shape[feature_dim])
            if self._sums is not None and per_feature.shape[1] != self.features:
                return
            finite = per_feature.nan_to_num(0.0, 0.0, 0.0)
            sums = torch.stack(
                [
                    torch.full_like(finite[0], float(finite.shape[0])),
                    finite.sum(0),
                    finite.square().sum(0),
                    (per_feature < 0).float().sum(0),
                ]
            ).double()
            self._sums = sums.cpu() if self._sums is None else self._sums + sums.cpu()
        self.features = per_feature.shape[1]
        self.samples += x.shape[0]
        self.batches += 1

    def facts(self) -> InputFacts | None:
        if self._sums is None:
            return None
        n, total, squares, negatives = self._sums
        mean = total / n
        std = (squares / n - mean.square()).clamp_min(0).sqrt()
        overall_mean = float(total.sum() / n.sum())
        overall_std = math.sqrt(max(float(squares.sum() / n.sum()) - overall_mean**2, 0.0))
        return InputFacts(
            batches=self.batches,
            samples=self.samples,
            features=self.features,
            mean=overall_mean,
            std=overall_std,
            negative_share=float(negatives.sum() / n.sum()),
            mostly_negative_features=float((negatives / n >= 0.99).double().mean()),
            feature_mean_min=float(mean.min()),
            feature_mean_max=float(mean.max()),
            feature_std_min=float(std.min()),
            feature_std_max=float(std.max()),
        )
