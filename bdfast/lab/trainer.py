"""A plain, fast supervised trainer: makes the lab's backdoored models and is the fine-tuning
baseline the defenses are compared with."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdfast._utils import progress as _progress
from bdfast._utils import (check_finite_parameters, check_number, check_training_inputs,
                           resolve_device, seed_everything, seeded_generator, steps_per_epoch)
from bdfast.defenses.augment import RandomCrop

__all__ = ["train"]


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 30, lr: float = 0.015,
          batch_size: int = 64, augment: bool = True, max_shift: Optional[int] = None,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
          device: Union[str, torch.device, None] = None, seed: Optional[int] = None,
          progress: bool = True) -> nn.Module:
    """Train ``model`` in place on ``(x [N, C, H, W], y [N] int64)`` with cross-entropy.

    SGD with Nesterov momentum (or AdamW with ``optimizer="adamw"``) and a per-step cosine
    schedule from ``lr`` to 0; batches are reshuffled every epoch. With ``augment``, each image is
    shifted by up to ``max_shift`` pixels, default ``max(1, min(H, W) // 8)``: 2 on 16x16, 4 on
    32x32 (the usual CIFAR pad-4 crop). The defaults are tuned on the 16x16 digits so that even
    the subtle WaNet backdoor is learned (stronger shifts generalise the trigger from its ~100
    poisoned images; a larger lr makes it unstable). ``seed`` fixes the shuffling, the
    augmentation and torch's global RNG, so the same seed and the same initial model give the
    same trained model on the CPU. Batches are moved one by one to ``device`` (default: the
    model's). Returns the model in eval mode. Raises ``FloatingPointError`` if the loss stops
    being finite, or if the last update makes a parameter non-finite.
    """
    check_training_inputs(model, x, y, epochs=epochs, batch_size=batch_size)
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if not lr > 0:  # inf passes; its first update then fails with a FloatingPointError
        raise ValueError(f"lr must be positive, got {lr!r}")
    if max_shift is None:
        max_shift = max(1, min(x.shape[-2:]) // 8)
    check_number(max_shift, "max_shift", integer=True, minimum=0)

    seed_everything(seed)
    generator = seeded_generator(seed)
    # Shifts only, zero-filled: the digits' background is black and they are not symmetric.
    # The offsets come from the generator of the batch order, so a seed fixes both.
    shift = RandomCrop(flip=False, padding=max_shift, generator=generator) \
        if augment and max_shift > 0 else None
    device = resolve_device(device, model)
    model.to(device)
    model.train()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                                     nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x)
    steps = steps_per_epoch(n, batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * steps))))

    bar = _progress(range(epochs), enabled=progress, desc="train", unit="epoch")
    for epoch in bar:
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb = x[idx.to(x.device)].to(device, non_blocking=True)
            yb = y[idx.to(y.device)].to(device, non_blocking=True)
            if shift is not None:
                xb = shift(xb)
            loss = F.cross_entropy(model(xb), yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss.item()} at epoch "
                                         f"{epoch + 1}, step {step + 1}; check x for NaN or "
                                         f"inf values, or lower lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / seen:.4f}")
    # The loss is checked before each update, so the last update is checked here.
    check_finite_parameters(model, f"in the last update of epoch {epochs} (lr {lr})")
    return model.eval()
