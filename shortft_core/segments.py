"""Trajectory segments on the 0..T-1 timestep axis: the one type for a LoRA set's segments and a shortcut's grid.

Segment j (1-based) of ``Segments(lowers)`` holds the timesteps ``lowers[j-1] <= t < lowers[j-2]`` (segment 1 runs
up to the top, T-1). SD1.5's 50-step chain cut at the anchors 761, 501, 261 is ``(761, 501, 261, 0)``: segments
981..761, 741..501, 481..261, 241..1, and the fine-tuned model uses segment j's LoRA set at those timesteps.

A few-step shortcut's grid (Hyper-SD 4-step: 999, 749, 499, 249) is the same object built from its *edges*
(:meth:`Segments.from_edges`): a shortcut call may jump from anywhere in a segment down to the segment's lower edge,
both edges included, which :meth:`covers` checks and :meth:`jump_segment` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

FINAL = -1  # target timestep of the clean end of a chain (as in schedule.FINAL)


def check_edges(edges: Sequence[int], name: str = "edges", num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """``edges`` as a tuple, or a ValueError naming the setting unless they strictly decrease inside 1..T-1."""
    e, n = tuple(int(v) for v in edges), num_train_timesteps
    if not e or any(a <= b for a, b in zip(e, e[1:])) or e[0] >= n or e[-1] <= 0:
        raise ValueError(f"{name} must be strictly decreasing timesteps in 1..{n - 1} (e.g. 999 749 499 249); "
                         f"got {list(e)}")
    return e


@dataclass(frozen=True)
class Segments:
    """k contiguous trajectory segments given by their lower ends (strictly descending, the last one 0)."""

    lowers: tuple[int, ...] = (761, 501, 261, 0)
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        lw = tuple(int(v) for v in self.lowers)
        object.__setattr__(self, "lowers", lw)
        if not lw or lw[-1] != 0 or any(a <= b for a, b in zip(lw, lw[1:])) or lw[0] >= self.num_train_timesteps:
            raise ValueError(f"segment lower ends must be strictly descending, below {self.num_train_timesteps}, "
                             f"and end with 0; got {list(lw)}")

    @classmethod
    def from_edges(cls, edges: Sequence[int], num_train_timesteps: int = 1000) -> "Segments":
        """Segments of a few-step grid from its upper edges, e.g. ``(999, 749, 499, 249)`` -> lowers 749, 499, 249, 0."""
        e = check_edges(edges, "edges", num_train_timesteps)
        return cls(e[1:] + (0,), num_train_timesteps)

    @classmethod
    def whole(cls, num_train_timesteps: int = 1000) -> "Segments":
        """One segment over the whole axis (a shortcut trained for any jump, e.g. TCD)."""
        return cls((0,), num_train_timesteps)

    @property
    def k(self) -> int:
        return len(self.lowers)

    @property
    def top(self) -> int:
        return self.num_train_timesteps - 1

    def upper(self, j: int) -> int:
        """Upper edge of segment j: the top for segment 1, else the lower end of segment j-1 (shared boundary)."""
        self._check(j)
        return self.top if j == 1 else self.lowers[j - 2]

    def range_of(self, j: int) -> tuple[int, int]:
        """Inclusive (low, high) timesteps of segment j."""
        self._check(j)
        high = self.top if j == 1 else self.lowers[j - 2] - 1
        return self.lowers[j - 1], high

    def segment_of(self, t: int) -> int:
        """The segment (1-based) holding timestep t."""
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside 0..{self.top}")
        for j, low in enumerate(self.lowers, start=1):
            if t >= low:
                return j
        raise AssertionError("unreachable")

    def jump_segment(self, t: int) -> int:
        """The segment a downward jump from t runs in: an upper edge belongs to the segment below it (from 749 on
        Hyper-SD's grid a call jumps to 499)."""
        return self.segment_of(min(max(int(t) - 1, 0), self.top))

    def jump_target(self, t: int) -> int:
        """Where a shortcut call from t lands: the lower edge of :meth:`jump_segment`, ``FINAL`` in the last one."""
        j = self.jump_segment(t)
        return self.lowers[j - 1] if j < self.k else FINAL

    def covers(self, t_from: int, t_to: int) -> bool:
        """True when one call from ``t_from`` down to ``t_to`` (``FINAL`` = the clean end) stays in one segment,
        its edges included."""
        if not t_from > t_to or t_from > self.top:
            return False
        j = self.jump_segment(t_from)
        return max(t_to, 0) >= self.lowers[j - 1]

    def edge_pairs(self) -> list[tuple[int, int]]:
        """``(upper, lower)`` edge pairs per segment; the last lower edge is ``FINAL``."""
        return [(self.upper(j), self.lowers[j - 1] if j < self.k else FINAL) for j in range(1, self.k + 1)]

    def _check(self, j: int) -> None:
        if not 1 <= j <= self.k:
            raise ValueError(f"segment {j} outside 1..{self.k}")
