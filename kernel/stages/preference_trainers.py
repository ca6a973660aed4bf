"""TRL's preference trainers, leaner: the same losses without the full logits, and DPO's
prompts computed once.

TRL 1.16's DPO trainer already takes its log-probabilities from a fused LM head (TRL's
``add_fused_lm_head``: the output projection in tiles, no ``(batch, length, vocabulary)``
logits); its CPO (SimPO) and ORPO trainers, in ``trl.experimental``, still project every
position onto the whole vocabulary and take a log-softmax over it, and so does the
experimental online DPO trainer. ``fused_log_probs`` and ``fused_completion_log_probs``
give those the same head. ``prompts_shared`` gives DPO shared-prompt rows
(``modelloop.data.shared_prompts``).
"""

from __future__ import annotations

from typing import Any

from modelloop.data.labels import IGNORE


def prompts_shared(trainer_class: Any) -> Any:
    """TRL's DPO trainer with the pairs in shared-prompt rows: its collator's batches carry
    the rows too, and the model (given TRL's fused head by TRL) runs them for the policy and
    the reference alike (``modelloop.models.shared_prompts``)."""
    from modelloop.data.shared_prompts import SharedPromptCollator
    from modelloop.models.shared_prompts import score_shared_prompt_rows

    class SharingPrompts(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.data_collator = SharedPromptCollator(self.data_collator)
            for model in (self.model, self.ref_model):  # no reference model under an adapter
                if model is not None:
                    score_shared_prompt_rows(_transformers_model(self.accelerator.unwrap_model(model)))

    SharingPrompts.__name__ = SharingPrompts.__qualname__ = trainer_class.__name__
    return SharingPrompts


def fused_log_probs(trainer_class: Any, *, orpo: bool) -> Any:
    """TRL's CPO or ORPO trainer (``orpo``) with each sequence's log-probability, and the
    chosen completions' likelihood loss, from TRL's fused LM head.

    What TRL's ``concatenated_forward`` returns, computed the same way: the log-probability
    of the completion's tokens, summed, or averaged per token (ORPO; CPO's ``ipo`` and
    ``simpo``); the negative log-likelihood of the chosen rows, over their completions
    (CPO, when ``cpo_alpha`` weighs it) or over every token (ORPO). One difference: the
    ``logits/*`` metrics average the logits over the completions' tokens (TRL's own: over
    every position, prompts and padding included, which the fused head never computes)."""
    from trl.trainer.utils import add_fused_lm_head

    class FusedLogProbs(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            add_fused_lm_head(
                _transformers_model(self.accelerator.unwrap_model(self.model)), outputs=("log_probs", "mean_logits")
            )

        def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
            if self.is_encoder_decoder:
                return super().concatenated_forward(model, batch)
            import torch

            inputs = self.concatenated_inputs(
                batch, padding_value=self.processing_class.pad_token_id, device=self.accelerator.device
            )
            ids, mask = inputs["concatenated_input_ids"], inputs["concatenated_attention_mask"]
            completion_labels = inputs["concatenated_labels"]
            chosen = batch["chosen_labels"].shape[0]
            scored = ids.masked_fill(mask == 0, IGNORE) if orpo else completion_labels
            extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
            outputs = model(ids, attention_mask=mask, labels=scored, fused_lm_head=True, use_cache=False, **extra)
            completion = completion_labels[:, 1:] != IGNORE
            logps = (outputs.log_probs * completion).sum(-1)
            if orpo or self.loss_type in ("ipo", "simpo"):
                logps = logps / completion.sum(-1)
            if orpo or self.cpo_alpha != 0:
                likelihood = (completion if not orpo else scored[:, 1:] != IGNORE)[:chosen]
                nll_loss = -(outputs.log_probs[:chosen] * likelihood).sum() / likelihood.sum()
            else:
                nll_loss = torch.tensor(0.0, device=ids.device)
            chosen_logits = outputs.mean_logits[:chosen][completion[:chosen]]
            rejected_logits = outputs.mean_logits[chosen:][completion[chosen:]]
            returned = (logps[:chosen], logps[chosen:], chosen_logits, rejected_logits, nll_loss)
            return (*returned, outputs.aux_loss) if self.aux_loss_enabled else returned

    FusedLogProbs.__name__ = FusedLogProbs.__qualname__ = trainer_class.__name__
    return FusedLogProbs


def fused_completion_log_probs(trainer_class: Any) -> Any:
    """TRL's online DPO trainer with its completions' per-token log-probabilities (policy
    and reference) from TRL's fused LM head: TRL's ``_forward`` takes a log-softmax over
    the whole vocabulary at every position of prompt and completion. Every completion
    position is scored, padding included, as TRL's are (its loss masks them, its KL and
    entropy metrics count them). Pictures, and an empty prompt, go TRL's own way."""
    from trl.trainer.utils import add_fused_lm_head

    class FusedCompletionLogProbs(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for model in (self.model, self.ref_model):  # no reference model under an adapter
                if model is not None:
                    add_fused_lm_head(_transformers_model(self.accelerator.unwrap_model(model)))

        def _forward(
            self,
            model: Any,
            prompt_ids: Any,
            prompt_mask: Any,
            completion_ids: Any,
            completion_mask: Any,
            vision_inputs: Any = None,
        ) -> Any:
            if vision_inputs is not None or prompt_ids.size(1) == 0:
                return super()._forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
            import torch

            cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)  # TRL's: the prompt's start
            prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
            outputs = model(
                torch.cat((prompt_ids, completion_ids), dim=1),
                attention_mask=torch.cat((prompt_mask, completion_mask), dim=1),
                labels=torch.cat((torch.full_like(prompt_ids, IGNORE), completion_ids), dim=1),
                fused_lm_head=True,
                use_cache=False,
            )
            return outputs.log_probs[:, prompt_ids.size(1) - 1 :]

    FusedCompletionLogProbs.__name__ = FusedCompletionLogProbs.__qualname__ = trainer_class.__name__
    return FusedCompletionLogProbs


def _transformers_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the one TRL's fused head goes on)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
