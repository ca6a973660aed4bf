"""GRPO's rollouts generated while the trainer learns: asynchronous generation.

In a synchronous run each step waits for its rollouts: the engine generates, the trainer
scores and learns, the engine generates again with the new weights. Here a worker thread
keeps an engine out of process busy instead: while the trainer learns from batch j, the
worker generates batch j + 1 (up to j + ``max_staleness``) with the newest weights it has.

- **Which prompts come next.** TRL's train sampler is seeded (``RepeatSampler``): drawn a
  second time it gives the trainer's order, batch for batch (``planned_batches``). Each
  batch the trainer asks for is checked against the one generated for it; a batch the
  plan did not foresee (a resumed run skipping batches) is generated on demand, the plan
  found again further on or, failing that, given up: every later batch waits for its call.
- **Policy versions.** At each call (a step, in the usual setting of one generation batch
  a step) the trainer saves the policy, in its own thread (the model is the trainer's),
  and publishes it; before each batch the worker hands the newest weights to the engine.
  Batch j waits until call j - ``max_staleness`` has published, so the weights it is
  generated with are at most ``max_staleness`` steps old when the trainer takes it, and at
  most ``max_staleness + 1`` batches are ever generated ahead (the bounded queue). With 0
  the run is the synchronous one, request for request.
- **Stale completions are weighed.** The engine returns each token's log-probability under
  the distribution it sampled from; the trainer (``modelloop.stages.rlhf.off_policy``)
  multiplies each token's loss by the ratio of the current policy's probability to it,
  truncated: TRL's importance-sampling correction for a sampler that is not the policy.
- **The engine is the worker's alone**: its session, adapter loads and restarts happen in
  the worker thread, evaluation batches included (served first, with the newest weights);
  an error there reaches the trainer at its next call.

TRL logs ``rollouts/staleness`` (steps between the weights that generated a batch and
those that learn from it) and ``rollouts/wait_seconds`` (how long the trainer waited).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.stages.episodes import prompt_key
from modelloop.stages.rollouts import EngineRollouts


@dataclass
class Generated:
    """A batch generated ahead: its prompts' keys, the step of the weights that generated
    it, and TRL's rollout output."""

    keys: list[str]
    step: int
    output: dict[str, Any]


class AsyncRollouts:
    """A ``rollout_func`` whose batches are generated ahead of the trainer, in a worker thread."""

    def __init__(self, rollouts: EngineRollouts, *, max_staleness: int, trainer_threads: int | None = None) -> None:
        self.rollouts = rollouts
        self.max_staleness = max_staleness
        self.trainer_threads = trainer_threads  # the trainer's share of the CPUs while the engine generates
        self._threads_before: int | None = None
        self.ahead_most = 0  # the most batches ever waiting for the trainer
        self._state = threading.Condition()
        self._plan: Iterator[list[Any]] | None = None
        self._plan_number = 0  # a new one once the plan is found again; older generations are dropped
        self._calls = 0  # the trainer's training calls so far (each publishes the weights it has)
        self._generated = 0  # batches of the plan generated for calls, or answered on demand in their place
        self._ready: deque[Generated] = deque()
        self._in_flight: list[str] | None = None  # the keys of the planned batch being generated
        self._weights: tuple[int, Path] | None = None  # saved, not yet handed to the engine
        self._saved_step: int | None = None
        self._served_step = 0
        self._demand: tuple[list[Any], Future[tuple[dict[str, Any], int]]] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ the trainer's side

    def __call__(self, prompts: Sequence[Any], trainer: Any) -> dict[str, Any]:
        started = time.perf_counter()
        training = trainer.model.training
        self._publish(trainer, counted=training)
        if self._worker is None:
            if self.trainer_threads is not None:
                import torch

                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(self.trainer_threads)
            self._plan = planned_batches(trainer)
            self._worker = threading.Thread(target=self._work, name="modelloop-rollouts", daemon=True)
            self._worker.start()
        keys = [prompt_key(prompt) for prompt in prompts]
        generated = self._take(keys) if training else None
        if generated is None:
            output, step = self._on_demand(list(prompts))
        else:
            output, step = generated.output, generated.step
        mode = "train" if training else "eval"
        trainer._metrics[mode]["rollouts/staleness"].append(float(trainer.state.global_step - step))
        trainer._metrics[mode]["rollouts/wait_seconds"].append(time.perf_counter() - started)
        return output

    def _publish(self, trainer: Any, *, counted: bool) -> None:
        """Save the policy if it changed since the last call, and count a training call."""
        step = trainer.state.global_step
        folder = self.rollouts.save_policy(trainer, step) if step != self._saved_step else None
        with self._state:
            if folder is not None:
                if self._weights is not None:  # never handed over: the newer weights replace them
                    shutil.rmtree(self._weights[1], ignore_errors=True)
                self._weights, self._saved_step = (step, folder), step
            self._calls += counted
            self._state.notify_all()

    def _take(self, keys: list[str]) -> Generated | None:
        """The batch generated for this call; batches the trainer skipped (a resumed run)
        are dropped. None if nothing generated is this call's: then the plan is looked for
        further on, and the caller has the batch generated on demand."""
        with self._state:
            self._state.wait_for(lambda: self._error is not None or bool(self._ready) or self._plan is None)
            self._raise_failure()
            for skipped, generated in enumerate(self._ready):
                if generated.keys == keys:
                    return self._skip(skipped)
            if self._in_flight == keys:
                skipped = len(self._ready)
                self._state.wait_for(lambda: self._error is not None or len(self._ready) > skipped)
                self._raise_failure()
                return self._skip(skipped)
            self._ready.clear()
            self._plan_number += 1  # what is being generated now is of the old plan
            self._generated = self._calls  # this call's batch is answered on demand
            if self._plan is not None:
                self._plan = self._found_after(self._plan, keys)
            self._state.notify_all()
            return None

    def _skip(self, skipped: int) -> Generated:
        for _ in range(skipped):
            self._ready.popleft()
        self._generated -= skipped  # generated for no call
        self._state.notify_all()
        return self._ready.popleft()

    def _found_after(self, plan: Iterator[list[Any]], keys: list[str]) -> Iterator[list[Any]] | None:
        """The plan from the batch after ``keys``, if one of the run's batches to come is
        theirs; else None, with a word: every later batch is generated when asked for."""
        for batch in plan:
            if [prompt_key(prompt) for prompt in batch] == keys:
                return plan
        print("modelloop: the rollouts could not foresee the trainer's prompts; each batch is generated when asked for")
        return None

    def _on_demand(self, prompts: list[Any]) -> tuple[dict[str, Any], int]:
        done: Future[tuple[dict[str, Any], int]] = Future()
        with self._state:
            self._raise_failure()
            self._demand = (prompts, done)
            self._state.notify_all()
        return done.result()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the worker after the batch it is generating, then the engine."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        if self._worker is not None:
            self._worker.join()
        if self._weights is not None:
            shutil.rmtree(self._weights[1], ignore_errors=True)
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
        self.rollouts.close()

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        demand = None
        try:
            while True:
                with self._state:
                    self._state.wait_for(self._has_work)
                    if self._closed:
                        return
                    demand, self._demand = self._demand, None
                    batch = None
                    if demand is None:
                        batch = next(self._plan, None)  # type: ignore[arg-type]
                        if batch is None:  # the run's batches are all generated
                            self._plan = None
                            self._state.notify_all()
                            continue
                        self._generated += 1
                        self._in_flight = [prompt_key(prompt) for prompt in batch]
                    weights, self._weights = self._weights, None  # taken only to generate with
                    plan = self._plan_number
                if weights is not None:
                    self.rollouts.serve(weights[1], weights[0])
                    self._served_step = weights[0]
                session = self.rollouts.session
                assert session is not None
                if demand is not None:
                    demand[1].set_result((self.rollouts.rollout(demand[0], session), self._served_step))
                    demand = None
                    continue
                output = self.rollouts.rollout(batch, session)  # type: ignore[arg-type]
                with self._state:
                    if plan == self._plan_number:
                        self._ready.append(Generated(self._in_flight or [], self._served_step, output))
                        self.ahead_most = max(self.ahead_most, len(self._ready))
                    self._in_flight = None
                    self._state.notify_all()
        except BaseException as error:
            with self._state:
                self._error = error
                waiting = [asked for asked in (demand, self._demand) if asked is not None]
                self._demand = None
                self._state.notify_all()
            for _, done in waiting:  # the batch it was answering, and one asked for meanwhile
                if not done.done():
                    done.set_exception(error)

    def _has_work(self) -> bool:
        """Something to answer, or a planned batch whose weights are recent enough: batch j
        once call j - max_staleness has published its weights."""
        if self._closed or self._demand is not None:
            return True
        return self._plan is not None and self._generated < self._calls + self.max_staleness


def planned_batches(trainer: Any) -> Iterator[list[Any]]:
    """The prompts of each batch TRL's GRPO trainer will generate for, in its order, on this
    process: its seeded train sampler drawn again, epoch after epoch, in the trainer's
    generation batches (one every ``steps_per_generation x num_iterations`` loader batches),
    the loader's batches dealt to the processes in turn, up to the run's last step."""
    dataset = trainer.train_dataset
    sampler = trainer._get_train_sampler(dataset)
    size = trainer._train_batch_size * trainer.args.steps_per_generation
    every = trainer.args.steps_per_generation * trainer.num_iterations
    processes, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    left = -(-trainer.state.max_steps * trainer.args.gradient_accumulation_steps // every)  # none past the last step
    while left > 0:
        indices = list(sampler)
        batches = [indices[start : start + size] for start in range(0, len(indices) - size + 1, size)]
        mine = batches[rank::processes]
        if not mine:
            return
        for number, batch in enumerate(mine):
            if number % every == 0 and left > 0:
                left -= 1
                yield [dataset[index]["prompt"] for index in batch]
