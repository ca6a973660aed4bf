"""Whether a training run's schedule can learn from its data, said before the first step.

A schedule is set in optimizer steps and rows per step, data comes in examples, and
packing turns many short examples into a few long rows: 200 short chats packed to 1,024
tokens are 8 rows, and a batch of 8 then makes every step an epoch. Such a run prints a
falling loss and learns little. One line says so while there is still time to change it.
"""

from __future__ import annotations

import math

#: Passes over the same rows past which a run learns its examples by heart.
MANY_PASSES = 10
#: Optimizer steps below which a whole run learns little whatever its learning rate.
FEW_STEPS = 30


def schedule_advice(
    *, rows: int, examples: int, rows_per_step: int, max_steps: int | None, epochs: float, packed: bool
) -> str | None:
    """One line on a schedule that cannot learn much from ``rows`` training rows (made of
    ``examples`` examples), or None.

    :param rows_per_step: rows one optimizer step takes: batch size x gradient accumulation
        x data-parallel ranks.
    :param max_steps: the step limit, which overrides ``epochs`` when set.
    """
    if rows <= 0:
        return None
    steps_per_epoch = math.ceil(rows / rows_per_step)
    steps = max_steps or math.ceil(epochs * steps_per_epoch)
    passes = steps / steps_per_epoch
    data = f"{examples} examples, packed into {rows} rows" if packed and rows != examples else f"{rows} examples"
    smaller = "a smaller batch_size" + (", packing=false or a shorter max_length" if packed else "")
    if steps_per_epoch == 1 and steps > 1:
        return f"one step of {rows_per_step} rows takes the whole data ({data}): the {steps} steps are {steps} passes over the same rows; for more steps per pass use {smaller}"
    if max_steps and passes >= MANY_PASSES:
        return f"{steps} steps of {rows_per_step} rows go over the data ({data}) {passes:.0f} times: expect it learned by heart; fewer steps or more data"
    if steps < FEW_STEPS:
        change = "raise max_steps" if max_steps else f"more epochs, or {smaller}"
        return f"the whole run is {steps} optimizer steps ({data}): too few to learn much; {change}"
    return None
