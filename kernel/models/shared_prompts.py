"""The model side of shared-prompt rows (``modelloop.data.shared_prompts``): a forward
that runs the rows and hands TRL its per-token results in the layout of TRL's batch.

TRL's DPO trainer calls the model with its batch and ``fused_lm_head=True`` (TRL's LM
head that returns per-token log-probabilities without the full logits, put on the model
by ``trl.trainer.utils.add_fused_lm_head``), for the policy and, adapters off, for the
reference. Given the rows as well, this forward runs TRL's fused head on them instead,
the labels already shifted (``shift_labels``) and only the positions that predict a
completion token handed to the head, and scatters each one's fields to where TRL's own
forward would have put them; TRL's losses, weights and metrics then read them
unchanged. Without the rows, or asked for logits, it is TRL's
forward on TRL's batch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from modelloop.data.shared_prompts import ROWS_KEY, attention_mask

#: The per-token fields of TRL's ``FusedCausalLMOutput`` (those not computed are None).
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def score_shared_prompt_rows(model: Any) -> None:
    """Give ``model`` (the transformers model under any adapter, already given TRL's fused
    head) a forward that takes shared-prompt rows under ``ROWS_KEY``."""
    fused = model.forward
    implementation = model.config._attn_implementation

    @functools.wraps(fused)
    def forward(*args: Any, **kwargs: Any) -> Any:
        rows = kwargs.pop(ROWS_KEY, None)
        if rows is None or not kwargs.get("fused_lm_head"):  # logits asked for: TRL's batch as it is
            return fused(*args, **kwargs)
        labels = kwargs.pop("labels")  # TRL's: pairs x width, whose shape the results take
        for replaced in ("input_ids", "attention_mask", "position_ids"):
            kwargs.pop(replaced, None)
        scored = rows["sources"]
        with only_scored_positions(model.base_model, scored):
            outputs = fused(
                input_ids=rows["input_ids"],
                position_ids=rows["position_ids"],
                attention_mask=attention_mask(rows["segment_ids"], rows["branches"], implementation, model.dtype),
                shift_labels=rows["targets"][None],
                **kwargs,
            )
        shape = (labels.shape[0], labels.shape[1] - 1)
        for name in PER_TOKEN_FIELDS:
            value = getattr(outputs, name, None)
            if value is not None:
                outputs[name] = in_pairs_layout(value, rows["destinations"], shape)
        return outputs

    model.forward = forward


@contextlib.contextmanager
def only_scored_positions(backbone: Any, scored: Any) -> Iterator[None]:
    """While the block runs, ``backbone`` hands on its final hidden states at the ``scored``
    flat positions only (one row of them): TRL's fused head then projects those onto the
    vocabulary, not every position of every row (on a CPU it projects all it is given)."""

    def gather(module: Any, inputs: Any, outputs: Any) -> Any:
        hidden = outputs.last_hidden_state
        outputs["last_hidden_state"] = hidden.reshape(-1, hidden.shape[-1])[scored][None]
        return outputs

    handle = backbone.register_forward_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def in_pairs_layout(value: Any, destinations: Any, shape: tuple[int, int]) -> Any:
    """A per-token field of the scored positions (one row, in ``destinations``' order) in
    TRL's layout, zero elsewhere as TRL leaves unscored positions; gradients flow through."""
    scattered = value.new_zeros(shape[0] * shape[1])
    return scattered.index_put((destinations,), value.reshape(-1)).view(shape)
