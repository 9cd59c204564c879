"""Learning-rate schedules as pure functions of the step, and the blocks' learning-rate scales."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear", "step")


def learning_rate(step: int, *, base_lr: float, schedule: str, total_steps: int,
                  warmup_steps: int = 0, step_size: int = 0, gamma: float = 0.1) -> float:
    """The learning rate for round `step` (0-based).

    constant: base_lr. cosine: from base_lr down to 0 at total_steps along a half cosine.
    linear: from base_lr down to 0 at total_steps along a line (BERT's fine-tuning schedule).
    step: multiplied by gamma every step_size rounds. A linear warm-up from base_lr/warmup_steps to
    base_lr over the first warmup_steps rounds comes before any of them.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule in ("cosine", "linear"):
        if total_steps <= 0:
            raise ValueError(f"the {schedule} schedule needs total_steps > 0")
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        if schedule == "linear":
            return base_lr * (1.0 - progress)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step_size <= 0:
        raise ValueError("the step schedule needs step_size > 0")
    return base_lr * gamma ** ((step - warmup_steps) // step_size)


def block_lr_scales(num_blocks: int, decay: float) -> list[float]:
    """Layer-wise learning-rate decay (discriminative fine-tuning, ULMFiT; ELECTRA's 0.8): block b
    of num_blocks, ordered from the input, trains at the schedule's rate times decay^(num_blocks-1-b).
    The last block (the head) keeps the full rate; the early blocks, holding the most general
    features, move least. 1.0: every block at the full rate."""
    if not 0 < decay <= 1:
        raise ValueError(f"lr_block_decay must be in (0, 1], got {decay}")
    return [decay ** (num_blocks - 1 - b) for b in range(num_blocks)]
