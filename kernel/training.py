"""What the training stages add to transformers' Trainer, and nothing it already does.

The Trainer runs the loop, gradient accumulation, the scheduler, checkpoint contents,
resume (optimizer, scheduler, RNG, data position) and the report_to integrations. Here:

- datasets and collators over modelloop's tokenised data, packed or padded, and over a
  data stream (``StreamingData``: read as training goes, its position kept in each
  checkpoint, ``modelloop.data.streaming``);
- the registry's samplers as a seeded, epoch-aware torch sampler;
- the optimizer from the tuner's parameter groups (per-group learning rates kept);
- the loss computed by the output layer a chunk of labelled positions at a time, never
  holding the full logits (``modelloop.models.output_loss``); where it cannot be,
  logits computed only where a label is (on chat data, a tenth of the positions);
- checkpoints written to a staging folder and renamed into place, so a killed run
  never leaves a half-written checkpoint for ``--resume`` to pick up (TRL's trainers
  get the same through ``with_atomic_checkpoints``);
- a rich progress bar (step, loss, tokens/s, ETA), ``metrics.jsonl``, the lifecycle
  ``on_log`` hook, and ``loss.png``;
- Ctrl-C saving a checkpoint of the step under way before the run stops.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from modelloop.data.labels import IGNORE
from modelloop.data.media import KINDS, Media, MediaTokens
from modelloop.data.packing import PackedRow, collate_packed, collate_padded, pack
from modelloop.data.streaming import STREAM_FILE, Stream, Streamed, StreamPosition
from modelloop.data.tokenize import TokenizedData
from modelloop.jsonl import read_jsonl, write_record
from modelloop.models.output_loss import OutputLayerLoss
from modelloop.specs import Sampler, Tuner

STAGING = ".partial"
#: The batch key that carries a stream's position after the batch (not a model input).
STREAM_POSITION = "stream_position"


class TrainingData(torch.utils.data.Dataset):
    """Training items: packed rows, or ``(input_ids, labels)`` of single examples."""

    def __init__(self, items: Sequence[Any], lengths: Sequence[int]) -> None:
        self.items = list(items)
        self.lengths = list(lengths)

    @classmethod
    def build(cls, data: TokenizedData, *, max_length: int, packing: bool) -> TrainingData:
        """Packed rows, or single examples: ``(input_ids, labels)``, with their media
        items as a third member when the data has any."""
        if packing:
            rows: list[PackedRow] = pack(data.input_ids, data.labels, max_length, data.media)
            return cls(rows, [len(row.input_ids) for row in rows])
        if data.media is not None:
            return cls(list(zip(data.input_ids, data.labels, data.media)), data.lengths)
        return cls(list(zip(data.input_ids, data.labels)), data.lengths)

    @property
    def modalities(self) -> list[str]:
        """Each item's modality: the last kind of ``KINDS`` it holds (``audio`` before
        ``image``; a packed row counts what any of its examples holds), else ``text``."""
        found = []
        for item in self.items:
            media = (
                [each for example in item.media for each in example]
                if isinstance(item, PackedRow)
                else (item[2] if len(item) > 2 else ())
            )
            held = {each.kind for each in media}
            found.append(next((kind.name for kind in reversed(KINDS) if kind.name in held), "text"))
        return found

    def split(self, share: float, seed: int) -> tuple[TrainingData, TrainingData]:
        """A seeded ``share`` of the items held out: ``(held out, the rest)``."""
        count = max(1, round(len(self) * share))
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        held, kept = sorted(order[:count]), sorted(order[count:])
        return self._select(held), self._select(kept)

    def _select(self, indices: Sequence[int]) -> TrainingData:
        return TrainingData([self.items[i] for i in indices], [self.lengths[i] for i in indices])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class StreamingData(torch.utils.data.IterableDataset):
    """Training items from a ``Stream``, read as training goes, each with the stream's
    position after it. It has no length and no end (a pass over the data ends where the
    next begins): the Trainer runs it to ``max_steps``."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __iter__(self):
        if not self.stream.resumed:
            # The draw torch's loader makes from the global generator for its seed, as the
            # Trainer's loader of a pre-tokenised run does: both paths train with the same
            # random numbers. (This loader seeds from its own generator, so that a resumed
            # run, which creates it after restoring the random states, draws nothing here.)
            torch.empty((), dtype=torch.int64).random_()
        for item, buffer, rows in self.stream.items():
            yield Streamed(item, StreamPosition(buffer, rows))


def arrange_items(
    data: TokenizedData,
    seed: int,
    *,
    max_length: int,
    packing: bool,
    sampler: Sampler,
    batch_size: int,
    options: Mapping[str, Any],
) -> list[Any]:
    """Training items in training order, as the pre-tokenised path makes them of a whole
    data set for the epoch of seed ``seed``: packed (or not), ordered by the sampler."""
    train_set = TrainingData.build(data, max_length=max_length, packing=packing)
    order = RegistrySampler(
        sampler,
        train_set.lengths,
        batch_size=batch_size,
        seed=seed,
        options=options,
        modalities=train_set.modalities if sampler.reads_modalities else None,
    )
    return [train_set.items[index] for index in order]


class Collator:
    """Batches items and counts the real (non-padding) training tokens it has handed out.

    With ``media`` (a multimodal model's ``MediaTokens``) a batch also carries its media
    items' model inputs and, where the family has one, the input marking their tokens;
    ``rope_index`` (the family's, bound to the model) gives packed rows their
    multimodal positions, each example's from 0.

    Unpacked items (``packing`` false) are padded to the longest, or with ``padding_free``
    placed side by side in rows no wider than the longest (best-fit decreasing, as packing
    does): the same examples a step and the same loss, in fewer rows of the same width at
    most, so never more tokens computed than padded, nor wider rows (attention costs a
    row's width squared).
    """

    def __init__(
        self,
        pad_token_id: int,
        packing: bool,
        multiple: int = 1,
        media: MediaTokens | None = None,
        rope_index: Callable[..., Any] | None = None,
        *,
        padding_free: bool = False,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.padding_free = padding_free
        self.multiple = multiple  # rows padded to a multiple of this many tokens (sequence parallelism, oneDNN)
        self.media = media
        self.rope_index = rope_index
        self.tokens = 0
        self.counting = True  # off while the Trainer evaluates

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], Streamed):  # the batch carries where the stream stands after it
            batch = self([item.item for item in items])
            batch[STREAM_POSITION] = items[-1].position
            return batch
        if self.packing:
            return self._packed(items)
        if self.padding_free:
            input_ids, labels = [item[0] for item in items], [item[1] for item in items]
            media = [item[2] for item in items] if len(items[0]) > 2 else None
            return self._packed(pack(input_ids, labels, max(map(len, input_ids)), media))
        self.tokens += self.counting * sum(len(item[0]) for item in items)
        batch = collate_padded(
            [item[0] for item in items], [item[1] for item in items], self.pad_token_id, self.multiple
        )
        return self._with_media(batch, [item for each in items if len(each) > 2 for item in each[2]])

    def _packed(self, rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
        self.tokens += self.counting * sum(len(row.input_ids) for row in rows)
        batch = collate_packed(rows, self.pad_token_id, self.multiple)
        return self._with_media(batch, [item for row in rows for example in row.media for item in example], rows)

    def _with_media(self, batch: dict[str, Any], media: list[Media], rows: Sequence[PackedRow] = ()) -> dict[str, Any]:
        if self.media is None:
            return batch
        by_kind = self.media.inputs_by_kind(media)
        for inputs in by_kind.values():
            batch.update(inputs)
        if media:
            batch.update(self.media.token_type_ids(batch["input_ids"]))
        if rows and self.rope_index is not None:
            batch["position_ids"] = self._packed_positions(batch, rows, media, by_kind)
        elif not rows and self.media.rope_index is not None:
            batch.pop("position_ids", None)  # plain positions would misplace the media: the model places them itself
        return batch

    def _packed_positions(
        self,
        batch: dict[str, Any],
        rows: Sequence[PackedRow],
        media: Sequence[Media],
        by_kind: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> torch.Tensor:
        """(4, rows, width): the plain positions (which tell transformers where each packed
        example starts), then each example's multimodal rotary positions from 0, from the
        batch's per-item inputs (its items are not processed again)."""
        assert self.media is not None
        text = batch["position_ids"]
        positions = text[None].repeat(4, 1, 1)
        token_types = next(iter(self.media.token_type_ids(batch["input_ids"]).values()), None)
        if token_types is None:
            token_types = torch.zeros_like(batch["input_ids"])
        totals = {kind: sum(item.kind == kind for item in media) for kind in by_kind}
        per_item = {  # e.g. each picture's grid, by kind
            kind: {key: value for key, value in inputs.items() if value.shape[:1] == (totals[kind],)}
            for kind, inputs in by_kind.items()
        }
        taken = dict.fromkeys(by_kind, 0)
        for number, row in enumerate(rows):
            start = 0
            for length, example in zip(row.lengths, row.media):
                end = start + length
                inputs: dict[str, Any] = {}
                for kind, tensors in per_item.items():
                    count = sum(item.kind == kind for item in example)
                    if count:
                        inputs.update({key: value[taken[kind] : taken[kind] + count] for key, value in tensors.items()})
                    taken[kind] += count
                ids = batch["input_ids"][number : number + 1, start:end]
                positions[1:, number, start:end] = self.rope_index(
                    ids, token_types[number : number + 1, start:end], inputs
                )[:, 0]
                start = end
        return positions


class RegistrySampler(torch.utils.data.Sampler[int]):
    """A registered sampler as a torch sampler: a new seeded order each epoch (whose
    length is the sampler's: a balancing sampler may repeat examples)."""

    def __init__(
        self,
        sampler: Sampler,
        lengths: Sequence[int],
        *,
        batch_size: int,
        seed: int,
        options: Mapping[str, Any] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        self.sampler = sampler
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.options = dict(options or {})
        if sampler.reads_modalities:
            self.options["modalities"] = list(modalities) if modalities is not None else ["text"] * len(self.lengths)
        self.epoch = 0
        self._order: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = self.sampler.order(
                self.lengths, batch_size=self.batch_size, seed=self.seed + self.epoch, **self.options
            )
            self._order = (self.epoch, list(order))
        return self._order[1]

    def __iter__(self):
        return iter(self._epoch_order())

    def __len__(self) -> int:
        return len(self._epoch_order())


NO_DECAY = ("bias", "norm")


def build_optimizer(
    model: torch.nn.Module,
    tuner: Tuner,
    options: Mapping[str, Any],
    family: Any,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    group_lr: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """The tuner's parameter groups (each keeping its own ``lr`` and extra keys), split so
    that biases and norm weights get no weight decay, given to the tuner's optimizer.

    ``group_lr`` sets the rate of the family's module groups (``vision``, ``aligner``,
    ``llm``): a tuner group spanning several is split along them, and a tuner's relative
    rate (``lr_scale``, LoRA+) applies to the module group's rate.
    """
    from modelloop.models.groups import group_of

    if tuner.parameter_groups is not None:
        groups = tuner.parameter_groups(model, options, family)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    module_groups = family.module_groups if family is not None else {}
    rates = group_lr or {}
    split = []
    for group in groups:
        extra = {key: value for key, value in group.items() if key != "params"}
        scale = extra.pop("lr_scale", None)
        by_module: dict[str | None, list[torch.Tensor]] = {}
        for parameter in group["params"]:
            if parameter.requires_grad:
                by_module.setdefault(
                    group_of(names.get(id(parameter), ""), module_groups) if rates else None, []
                ).append(parameter)
        for module_group, parameters in by_module.items():
            rate = dict(extra)
            base = rates.get(module_group) if module_group is not None else None
            if scale is not None:  # relative to the configured learning rate (LoRA+)
                rate["lr"] = (base or lr) * scale
            elif base is not None:
                rate["lr"] = base
            decayed = [p for p in parameters if not any(word in names.get(id(p), "").lower() for word in NO_DECAY)]
            decayed_ids = {id(p) for p in decayed}
            plain = [p for p in parameters if id(p) not in decayed_ids]
            for members, decay in ((decayed, weight_decay), (plain, 0.0)):
                if members:
                    split.append({**rate, "params": members, "weight_decay": group.get("weight_decay", decay)})
    if not split:
        raise ValueError(f"the {tuner.name} tuner left no parameter to train")
    split = by_device_mesh(split)
    if tuner.optimizer is not None:
        return tuner.optimizer(split, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8)
    return torch.optim.AdamW(split, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8, foreach=True)


def by_device_mesh(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split so that its parameters share one device mesh: a foreach kernel
    cannot span plain tensors and DTensors, and tensor parallelism leaves some of each."""
    split = []
    for group in groups:
        meshes: dict[Any, list[torch.Tensor]] = {}
        for parameter in group["params"]:
            meshes.setdefault(getattr(parameter, "device_mesh", None), []).append(parameter)
        split.extend({**group, "params": members} for members in meshes.values())
    return split


class AtomicCheckpoints:
    """A Trainer mixin: each checkpoint is written under ``.partial/`` and renamed into place,
    so a killed run never leaves a half-written checkpoint for ``--resume`` to pick up.

    With several processes every rank writes its part (its RNG state, its optimizer
    shard) first; the rename waits for all of them."""

    _staging_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write the checkpoint under ``.partial/``, then rename it into place."""
        final_root = self.args.output_dir
        self._staging_dir = os.path.join(final_root, STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(final_root, STAGING, name), target)
            rotate_checkpoints(final_root, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class TunerOptimizer:
    """A Trainer mixin: the optimizer is ``optimizer_factory(model)`` (the tuner's parameter
    groups, ``build_optimizer``), built when the trainer asks for it. transformers refuses
    an optimizer passed in with FSDP or DeepSpeed: its integrations create it at their
    own moment and map it onto the sharded parameters."""

    def __init__(self, *args: Any, optimizer_factory: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_factory = optimizer_factory

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None and self.optimizer_factory is not None:
            self.optimizer = self.optimizer_factory(self.model if model is None else model)
        return super().create_optimizer(model)


def modelloop_trainer_class(trainer_class: type) -> type:
    """``trainer_class`` (one of TRL's) with modelloop's checkpoints and optimizer mixed in."""
    return type(trainer_class.__name__, (AtomicCheckpoints, TunerOptimizer, trainer_class), {})


class ModelloopTrainer(AtomicCheckpoints, TunerOptimizer, Trainer):
    """Trainer with registry samplers, the tuner's optimizer, atomically appearing
    checkpoints, and the loss computed in the output layer (``output_loss``, see
    ``modelloop.models.output_loss``) or, without one, from the logits at labelled
    positions only. Trained from ``StreamingData``, each checkpoint also holds the
    stream's position after the last batch trained (``STREAM_FILE``)."""

    def __init__(
        self,
        *args: Any,
        train_sampler: torch.utils.data.Sampler | None = None,
        output_loss: OutputLayerLoss | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._train_sampler = train_sampler
        self.output_loss = output_loss
        self._logits_at_labels_only = slices_logits_by_mask(self.model)
        self._parameter_count: int | None = None
        self.stream_position: StreamPosition | None = None  # after the last batch trained

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        position = inputs.pop(STREAM_POSITION, None)
        if position is not None:
            self.stream_position = position
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_rng_state(self, output_dir: str) -> None:
        """The random states, and where the data stream stands: what a resumed run needs to
        draw the numbers and read the batches an uninterrupted one would."""
        super()._save_rng_state(output_dir)
        if self.stream_position is not None and self.args.should_save:
            with open(os.path.join(output_dir, STREAM_FILE), "w") as out:
                json.dump(self.stream_position.to_dict(), out, indent=1)

    def get_train_dataloader(self) -> Any:
        """For ``StreamingData``: its batches as they come, the loader seeded from its own
        generator (see ``StreamingData.__iter__``)."""
        if not isinstance(self.train_dataset, StreamingData):
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            pin_memory=self.args.dataloader_pin_memory,
            generator=torch.Generator(),
        )
        return self.accelerator.prepare(loader)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' estimate (6 x tokens x parameters) with the parameters counted once,
        not on every step (a walk over every module, 2 ms a step on a small model)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The loss from the output layer, without the full logits; else the model's own,
        with the vocabulary projection skipped where no label is."""
        if "labels" in inputs and "shift_labels" not in inputs:
            if self.output_loss is not None and (not return_outputs or self.args.prediction_loss_only):
                return self._loss_in_output_layer(model, inputs, return_outputs, num_items_in_batch)
            if self._logits_at_labels_only and not return_outputs:
                inputs = logits_at_labels(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _loss_in_output_layer(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any
    ) -> Any:
        """The same loss the model would return, and the same scaling as the Trainer gives
        it (per labelled token of the accumulated batch, across processes), but computed
        by the output layer."""
        assert self.output_loss is not None
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        divisor = num_items_in_batch if self.model_accepts_loss_kwargs else None
        with self.output_loss.computing(shifted_labels(labels), divisor):
            outputs = model(**inputs)
        loss = outputs.logits
        if getattr(outputs, "aux_loss", None) is not None:  # a mixture of experts' router balancing
            loss = loss + self.model.config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            loss = loss * self.accelerator.num_processes  # the gradients are averaged over the processes
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Evaluate without counting evaluation batches as training tokens."""
        collator = self.data_collator
        counting = getattr(collator, "counting", None)
        if counting is not None:
            collator.counting = False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if counting is not None:
                collator.counting = counting

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        return self._train_sampler or super()._get_train_sampler(train_dataset)


def logits_at_labels(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Model inputs asking for logits only at the positions that predict a label.

    transformers takes a boolean ``logits_to_keep`` mask and ``shift_labels`` already
    shifted; the loss is the same as over every position, where ignored labels add nothing.
    """
    shifted = shifted_labels(inputs["labels"])
    keep = shifted != IGNORE
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the next one (the last position predicts none)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


def slices_logits_by_mask(model: torch.nn.Module) -> bool:
    """Whether the model's forward is one of transformers' own, taking ``logits_to_keep``
    (which there also accepts a boolean mask). Remote-code models may take only an int,
    and so may a forward an accelerator put on the instance (Liger's slices the hidden
    states with it, and a mask there raises IndexError)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base.forward, "__func__", base.forward)
    return (
        forward.__module__.startswith("transformers.models.")
        and "logits_to_keep" in inspect.signature(forward).parameters
    )


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; a half-written one (left in staging) is removed."""
    shutil.rmtree(checkpoints / STAGING, ignore_errors=True)
    found = [p for p in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def step_of(checkpoint: Path | None) -> int:
    """The optimizer step a checkpoint was saved after (0 for none: a run from the start)."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0


def resume_point(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from (None: it starts afresh), said on stdout.

    ``resume`` is False, or the run being resumed and the checkpoint asked for (None: its
    newest complete one)."""
    from modelloop.parallel.world import is_main_process

    if not resume:
        return None
    checkpoint = resume[1] or latest_checkpoint(run_dir / "checkpoints")
    if is_main_process():
        print(
            f"modelloop: resuming from {checkpoint}"
            if checkpoint
            else f"modelloop: resuming {run_dir}: no checkpoint was saved, so from the first step"
        )
    return checkpoint


def whole_run_losses(metrics_path: Path, attempt_loss: float, resumed_at: int, final_step: int) -> dict[str, float]:
    """The run's mean training loss over all its steps (``train_loss``) and its last logged
    loss (``train_loss_last``).

    transformers averages over the steps of the last attempt only; for a resumed run the
    losses logged before ``resumed_at`` are added in, each weighted by the steps it covers.
    """
    logged = [(record["step"], record["loss"]) for record in read_jsonl(metrics_path) if record.get("loss") is not None]
    total, steps, previous = attempt_loss * (final_step - resumed_at), final_step - resumed_at, 0
    for step, loss in logged:
        if step <= resumed_at:
            total, steps, previous = total + loss * (step - previous), steps + step - previous, step
    losses = {"train_loss": total / steps if steps else attempt_loss}
    if logged:
        losses["train_loss_last"] = logged[-1][1]
    return losses


class MeasureFromFirstStep(TrainerCallback):
    """Restart a ``PeakMemory`` when training begins, after the model is wrapped."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.memory.restart()


class StopWithCheckpoint(TrainerCallback):
    """Ctrl-C (SIGINT, which the ui's Stop sends too) ends training at the end of the step
    under way, with a checkpoint of it, instead of dropping every step since the last one
    saved (all of them when ``save_steps`` is unset). A second Ctrl-C stops at once.

    One process only (``catching`` does nothing in a launched worker): the ranks of a job
    take the signal each at its own step, and the launcher stops them as before.
    """

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """SIGINT handled as above while the block runs (from the main thread, where Python
        delivers signals), and as before after it."""
        from modelloop.parallel.world import in_worker

        if in_worker() or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._interrupted)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupted(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "modelloop: stopping at the end of this step, with a checkpoint (Ctrl-C again stops now)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = control.should_training_stop = True


class ReportCallback(TrainerCallback):
    """Progress bar, metrics.jsonl and the lifecycle ``on_log`` hook."""

    def __init__(
        self,
        metrics_path: Path,
        log_hook: Callable[[int, Mapping[str, float]], None],
        *,
        tokens: Callable[[], int] | None = None,
    ) -> None:
        self.metrics_path = metrics_path
        self.log_hook = log_hook
        self.tokens = tokens  # the training tokens handed out so far, for tokens/s
        self.progress: Any = None
        self.task: Any = None
        self.started = 0.0
        self.tokens_at_start = 0
        self.last_log = (0.0, 0)  # when the last training log was written, and the tokens by then

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not state.is_world_process_zero:
            return
        self._forget_after(state.global_step)
        speed = [TextColumn("{task.fields[speed]} tok/s")] if self.tokens else []
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            *speed,
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", speed="-"
        )
        self.started = time.perf_counter()
        self.tokens_at_start = self.tokens() if self.tokens else 0
        self.last_log = (self.started, self.tokens_at_start)

    def _forget_after(self, step: int) -> None:
        """Drop what an earlier attempt logged after ``step`` (where a resumed run starts
        again, 0 for a run started afresh), so that nothing is logged twice."""
        if self.metrics_path.exists():
            kept = [record for record in read_jsonl(self.metrics_path) if record["step"] <= step]
            with self.metrics_path.open("w") as out:
                for record in kept:
                    write_record(out, record)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.started
        if self.tokens is None:
            self.progress.update(self.task, completed=state.global_step)
            return
        speed = (self.tokens() - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.task, completed=state.global_step, speed=f"{speed:,.0f}")

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        numbers = {key: float(value) for key, value in logs.items() if isinstance(value, (int, float))}
        if self.tokens is not None and "loss" in numbers:  # the speed since the last training log
            now, tokens = time.perf_counter(), self.tokens()
            if now > self.last_log[0]:
                numbers["tokens_per_second"] = (tokens - self.last_log[1]) / (now - self.last_log[0])
            self.last_log = (now, tokens)
        with self.metrics_path.open("a") as out:
            write_record(out, {"step": state.global_step, **numbers})
        if self.progress is not None and "loss" in numbers:
            self.progress.update(self.task, loss=f"{numbers['loss']:.4f}")
        self.log_hook(state.global_step, numbers)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def plot_losses(metrics_path: Path, out: Path) -> None:
    """``loss.png``: training loss and (when there is one) evaluation loss against step."""
    plot_metrics(metrics_path, out, {"loss": "train loss", "eval_loss": "eval loss"}, ylabel="loss")


def plot_metrics(metrics_path: Path, out: Path, series: Mapping[str, str], *, ylabel: str) -> None:
    """A line per metric of ``series`` (metric -> label) found in ``metrics.jsonl``, against
    step. Without matplotlib (a trimmed environment, such as a GPU image) the run still
    completes, with a warning: the numbers are all in ``metrics.jsonl``."""
    try:
        import matplotlib
    except ImportError:
        from modelloop.log import warn_once

        warn_once(f"{out.name} not drawn: matplotlib is not installed (the figures are in {metrics_path.name})")
        return
    matplotlib.use("Agg")
    from matplotlib import pyplot

    points: dict[str, list[tuple[int, float]]] = {key: [] for key in series}
    for record in read_jsonl(metrics_path):
        for key in series:
            if record.get(key) is not None:  # null: a value that was not a finite number
                points[key].append((record["step"], record[key]))
    figure, axes = pyplot.subplots(figsize=(7, 4))
    for key, label in series.items():
        if points[key]:
            sparse = key.startswith("eval_") or len(points[key]) == 1  # a lone point as a line draws nothing
            axes.plot(*zip(*points[key]), "o-" if sparse else "-", label=label)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if any(points.values()):
        axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    pyplot.close(figure)


@dataclass(frozen=True)
class TrainingJob:
    """What a parallel strategy with its own training loop (``ParallelStrategy.train``)
    gets from the stage: everything checked, tokenised and planned, no weights loaded.

    :param model_path: the transformers folder of the weights to start from.
    :param data: the training rows; ``sampler`` orders them per epoch, ``collator``
        counts the tokens handed out (tokens/s), ``pad_token_id`` pads.
    :param report: the progress bar, ``metrics.jsonl`` and ``on_log`` hook, driven with
        a state that has ``global_step``, ``max_steps`` and ``is_world_process_zero``.
    :param memory: restarted before the first step; ``measured()`` gives the peak.
    """

    config: Any
    plan: Any
    model_path: Path
    model_config: Any
    data: TrainingData
    sampler: RegistrySampler
    collator: Collator
    pad_token_id: int
    report: ReportCallback
    memory: Any
    run_dir: Path
