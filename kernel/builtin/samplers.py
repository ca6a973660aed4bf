"""Built-in samplers: ``random`` (seeded shuffle), ``length_grouped`` and ``modality_balanced``.

``length_grouped`` draws examples of similar length together so that, with packing
off, a batch pads little: it shuffles, cuts the order into mega-batches of
``batch_size * 50`` examples, sorts each by length, and shuffles the resulting batches
(so the model does not see lengths in order).

``modality_balanced`` gives every batch its share of pictured examples (``image_share``,
spread evenly when a batch cannot hold the exact share). The epoch ends when the
modality that runs out last has been seen once; the other is drawn again, in a new
order each round, so skewed data never leaves a batch without it. All are deterministic
for a seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from modelloop.hooks import hookimpl
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


def modality_balanced_order(
    lengths: Sequence[int], *, batch_size: int, seed: int, modalities: Sequence[str], image_share: float = 0.5
) -> Iterator[int]:
    if not 0 < image_share < 1:
        raise ValueError(f"image_share must be between 0 and 1, got {image_share}")
    rng = random.Random(seed)
    pools = {
        kind: [index for index, modality in enumerate(modalities) if modality == kind] for kind in ("image", "text")
    }
    if not pools["image"] or not pools["text"]:  # one modality: nothing to balance
        return random_order(lengths, batch_size=batch_size, seed=seed)
    shares = {"image": image_share, "text": 1 - image_share}
    batches = max(math.ceil(len(pools[kind]) / (shares[kind] * batch_size)) for kind in pools)
    draws = {kind: _rounds(pool, rng) for kind, pool in pools.items()}
    order = []
    for number in range(batches):
        # images in batch ``number``: the whole part of the running share, so that any
        # batch_size (even 1) averages exactly ``image_share``
        images = math.floor((number + 1) * image_share * batch_size) - math.floor(number * image_share * batch_size)
        batch = [next(draws["image"]) for _ in range(images)] + [
            next(draws["text"]) for _ in range(batch_size - images)
        ]
        rng.shuffle(batch)
        order += batch
    return iter(order)


def _rounds(pool: list[int], rng: random.Random) -> Iterator[int]:
    """The pool in a new shuffled order each round, for ever."""
    while True:
        shuffled = list(pool)
        rng.shuffle(shuffled)
        yield from shuffled


SAMPLERS = (
    Sampler(name="random", description="seeded shuffle", order=random_order),
    Sampler(name="length_grouped", description="batches of similar length (less padding)", order=length_grouped_order),
    Sampler(
        name="modality_balanced",
        description="a set share of pictured examples in every batch",
        order=modality_balanced_order,
    ),
)


@hookimpl
def register_samplers(register):
    for sampler in SAMPLERS:
        register(sampler)
