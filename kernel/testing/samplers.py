"""Samplers: ``order`` gives valid indices that cover the epoch (each example at least
once; a balancing sampler may repeat some), and the same seed gives the same order.

A sampler that reads modalities gets one example in three marked ``image``.
"""

from __future__ import annotations

import operator
import random

from modelloop.specs import Sampler
from modelloop.testing.kit import Broken, Check
from modelloop.testing.workspace import Workspace

#: Token counts of an epoch of 37 examples, of very different lengths.
LENGTHS = random.Random(0).choices(range(5, 400), k=37)
BATCH_SIZE = 4


def checks(sampler: Sampler) -> list[Check]:
    return [
        Check("sampler", sampler, "order gives valid indices covering the epoch", covers_the_epoch),
        Check("sampler", sampler, "the same seed gives the same order", is_seeded),
    ]


def drawn(sampler: Sampler, seed: int) -> list[int]:
    options = (
        {"modalities": ["image" if index % 3 == 0 else "text" for index in range(len(LENGTHS))]}
        if sampler.reads_modalities
        else {}
    )
    order = list(sampler.order(list(LENGTHS), batch_size=BATCH_SIZE, seed=seed, **options))
    for position, index in enumerate(order):
        try:
            operator.index(index)
        except TypeError:
            raise Broken(f"order gave {index!r} at position {position}, not an example's index") from None
        if not 0 <= index < len(LENGTHS):
            raise Broken(f"order gave index {index}, outside the {len(LENGTHS)} examples")
    return [int(index) for index in order]


def covers_the_epoch(sampler: Sampler, workspace: Workspace) -> None:
    missing = sorted(set(range(len(LENGTHS))) - set(drawn(sampler, seed=0)))
    if missing:
        raise Broken(f"order left out {len(missing)} of the {len(LENGTHS)} examples (the first: {missing[0]})")


def is_seeded(sampler: Sampler, workspace: Workspace) -> None:
    if drawn(sampler, seed=7) != drawn(sampler, seed=7):
        raise Broken("the same seed gave another order: a resumed run would see other examples")
