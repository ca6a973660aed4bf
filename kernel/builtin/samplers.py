"""Built-in samplers: ``random`` (seeded shuffle) and ``length-grouped``.

``length-grouped`` draws examples of similar length together so that, with packing
off, a batch pads little: it shuffles, cuts the order into mega-batches of
``batch_size * 50`` examples, sorts each by length, and shuffles the resulting batches
(so the model does not see lengths in order). Both are deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from modelloop import hookimpl
from modelloop.specs import Sampler

MEGA_BATCHES = 50


def random_order(lengths: Sequence[int], *, batch_size: int, seed: int) -> Iterator[int]:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return iter(order)


def length_grouped_order(lengths: Sequence[int], *, batch_size: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = max(1, batch_size * MEGA_BATCHES)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda index: -lengths[index])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return (index for batch in batches for index in batch)


SAMPLERS = (
    Sampler(name="random", description="seeded shuffle", order=random_order),
    Sampler(name="length-grouped", description="batches of similar length (less padding)", order=length_grouped_order),
)


@hookimpl
def register_samplers(register):
    for sampler in SAMPLERS:
        register(sampler)
