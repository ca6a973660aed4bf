"""A schedule that cannot learn much from its data is said before the first step."""

from __future__ import annotations

from modelloop.schedule import schedule_advice


def test_packed_short_examples_that_fit_one_step_are_named():
    """The newcomer's case: 200 short chats packed to 1,024 tokens make 8 rows, a batch of 8."""
    advice = schedule_advice(rows=8, examples=200, rows_per_step=8, max_steps=30, epochs=1, packed=True)
    assert advice == (
        "one step of 8 rows takes the whole data (200 examples, packed into 8 rows): the 30 steps are 30 passes "
        "over the same rows; for more steps per pass use a smaller batch_size, packing=false or a shorter max_length"
    )


def test_steps_that_go_over_the_data_many_times_are_named():
    advice = schedule_advice(rows=100, examples=100, rows_per_step=8, max_steps=200, epochs=1, packed=False)
    assert (
        advice
        == "200 steps of 8 rows go over the data (100 examples) 15 times: expect it learned by heart; fewer steps or more data"
    )


def test_a_run_of_a_few_steps_is_named_with_what_to_change():
    by_epochs = schedule_advice(rows=100, examples=100, rows_per_step=8, max_steps=None, epochs=1, packed=False)
    assert (
        by_epochs
        == "the whole run is 13 optimizer steps (100 examples): too few to learn much; more epochs, or a smaller batch_size"
    )
    by_steps = schedule_advice(rows=1000, examples=1000, rows_per_step=8, max_steps=10, epochs=1, packed=False)
    assert by_steps == "the whole run is 10 optimizer steps (1000 examples): too few to learn much; raise max_steps"


def test_a_schedule_that_can_learn_says_nothing():
    assert schedule_advice(rows=2000, examples=2000, rows_per_step=8, max_steps=None, epochs=1, packed=False) is None
    assert (
        schedule_advice(rows=400, examples=2000, rows_per_step=8, max_steps=200, epochs=1, packed=True) is None
    )  # 4 passes
    assert (
        schedule_advice(rows=1, examples=1, rows_per_step=8, max_steps=1, epochs=1, packed=False) is not None
    )  # one step is still few
