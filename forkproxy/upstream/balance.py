"""Choosing a member of a pool, free of I/O.

``SmoothWeighted`` is nginx's smooth weighted round robin: each pick adds
every candidate's weight to its running score, takes the highest and takes
the sum of the weights off the winner. Over any window the shares follow the
weights, and a heavy member's turns are spread out instead of coming in a
burst (weights 5, 1, 1 give a a b a c a a, not a a a a a b c).

``least_busy`` is for long requests (LLM streams): the candidate with the
fewest requests in flight relative to its weight, ties in round-robin order.
"""
from __future__ import annotations

from typing import Sequence


class SmoothWeighted:
    """The running scores of nginx's smooth weighted round robin over members 0..n-1."""

    __slots__ = ("weights", "scores")

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = list(weights)
        self.scores = [0] * len(self.weights)

    def pick(self, candidates: Sequence[int]) -> int:
        """One of ``candidates`` (members that may take a request now); the scores of the others stay."""
        weights, scores = self.weights, self.scores
        best, total = candidates[0], 0
        for i in candidates:
            scores[i] += weights[i]
            total += weights[i]
            if scores[i] > scores[best]:
                best = i
        scores[best] -= total
        return best


def least_busy(candidates: Sequence[int], in_flight: Sequence[int], order: SmoothWeighted) -> int:
    """The candidate with the fewest in flight per unit of weight; ties go round robin."""
    weights = order.weights
    load = {i: in_flight[i] / weights[i] for i in candidates}
    lowest = min(load.values())
    tied = [i for i in candidates if load[i] == lowest]
    return tied[0] if len(tied) == 1 else order.pick(tied)
