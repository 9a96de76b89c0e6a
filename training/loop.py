"""The optimisation loop the starter generator's stages share: step, log, stop at a step count or time budget.

Each stage (VAE, transformer, adapter in `training.generator_pretrain`) supplies only its batch loss and
the extras around the optimizer step (gradient clipping, a learning-rate warm-up, an EMA update).
`training.trainer` keeps its own loop: gradient accumulation over processes, checkpoints and resume are its
alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class BatchLoss:
    """One step's objective to minimise, the value recorded per step (default: the objective) and log extras."""

    objective: torch.Tensor
    recorded: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def run_steps(
    stage: str,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[int], BatchLoss],
    *,
    steps: int,
    max_seconds: float | None = None,
    log_every: int = 50,
    recorded_name: str = "loss",
    clip_parameters: Sequence[torch.Tensor] | None = None,
    lr_at_step: Callable[[int], float] | None = None,
    after_step: Callable[[int], None] | None = None,
    start_step: int = 0,
    recorded: Sequence[float] = (),
    elapsed_seconds: float = 0.0,
    checkpoint: Callable[[int, list[float], float], None] | None = None,
    checkpoint_every_seconds: float = 120.0,
) -> list[float]:
    """Run up to `steps` optimizer steps (fewer once `max_seconds` have passed); returns the recorded values.

    Per step: batch_loss(step), zero the gradients, backward, clip to norm 1 (`clip_parameters`), set the
    learning rate (`lr_at_step`), optimizer step, `after_step(step)`. Every `log_every` steps, and when time
    runs out, a JSON line with the mean recorded value of the last `log_every` steps goes to stdout.

    Resuming: `start_step`, the values `recorded` so far and the `elapsed_seconds` already spent continue an
    earlier run (the time budget counts them). `checkpoint(steps_done, recorded, elapsed)` is called every
    `checkpoint_every_seconds` and once at the end.
    """
    recorded, started = list(recorded), time.perf_counter() - elapsed_seconds
    last_saved, done = time.perf_counter(), start_step
    for step in range(start_step, steps):
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break  # a resumed run whose budget is already spent
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.objective.backward()
        if clip_parameters is not None:
            torch.nn.utils.clip_grad_norm_(clip_parameters, 1.0)
        if lr_at_step is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        recorded.append((loss.objective if loss.recorded is None else loss.recorded).item())
        done = step + 1
        if (step + 1) % log_every == 0:
            extras = {name: value.item() for name, value in loss.extras.items()}
            log_line(stage, step + 1, started, **{recorded_name: np.mean(recorded[-log_every:])}, **extras)
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            log_line(stage, step + 1, started, **{recorded_name: np.mean(recorded[-log_every:])}, stopped="max_seconds")
            break
        if checkpoint is not None and time.perf_counter() - last_saved > checkpoint_every_seconds:
            checkpoint(done, recorded, time.perf_counter() - started)
            last_saved = time.perf_counter()
    if checkpoint is not None:
        checkpoint(done, recorded, time.perf_counter() - started)
    return recorded


def log_line(stage: str, step: int, started: float, **values) -> None:
    """Print one JSON progress line: stage, step, seconds since `started`, and the values rounded to 5 places."""
    line = {"stage": stage, "step": step, "seconds": round(time.perf_counter() - started, 1)}
    line.update({k: round(float(v), 5) if isinstance(v, (float, np.floating)) else v for k, v in values.items()})
    print(json.dumps(line), flush=True)
