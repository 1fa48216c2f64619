"""Weighted sums of rewards, with every term kept for logging.

``WeightedReward([("pickscore", 10, r1), ("hps_v2", 2, r2)])(images, prompts) = 10 * r1 + 2 * r2``. Terms may
sit on different devices; each receives the images on its own device and returns its score on theirs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import Reward


class WeightedReward(Reward):
    """``sum_i weight_i * reward_i(images, prompts)``; per-term raw scores via :meth:`term_scores` and, after each
    call, detached in ``last_terms`` (label -> (B,) tensor) for the trainer's logs."""

    def __init__(self, terms: Sequence[tuple[str, float, Reward]], name: str | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedReward needs at least one (label, weight, reward) term")
        labels = [t[0] for t in terms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"WeightedReward: duplicate term labels {labels}; merge their weights")
        self.labels = labels
        self.weights = [float(t[1]) for t in terms]
        self.rewards = torch.nn.ModuleList(t[2] for t in terms)
        self.name = name or " + ".join(f"{w:g}*{lab}" for lab, w in zip(self.labels, self.weights))
        self.last_terms: dict[str, torch.Tensor] = {}
        self.freeze()

    @property
    def device(self) -> None:
        return None  # each term moves the images to its own device

    def term_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Raw (unweighted, differentiable) score of every term, on the images' device."""
        return {label: reward(images, prompts) for label, reward in zip(self.labels, self.rewards)}

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        terms = self.term_scores(images, prompts)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return sum(w * terms[label] for label, w in zip(self.labels, self.weights))

    def extra_repr(self) -> str:
        return self.name
