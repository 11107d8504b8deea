"""Metrics of a backdoor defense, all fractions in [0, 1].

- ACC: share of the clean test images ``(x, y)`` classified as ``y``.
- ASR (attack success rate): the attack's trigger is applied to every test image whose true label
  is not the target (target-class images are excluded); ASR is the share of these triggered images
  classified as the target. For an all-to-all attack every test image is triggered and its target
  is ``(y + 1) mod C``, C the number of model outputs.
- RA (robust accuracy): share of the same triggered images classified as their true label ``y``.
- DER (defense effectiveness rating), from the metrics before and after a defense:
  ``DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2``, in [0, 1];
  0.5 means no change, 1 a perfect defense (ASR 1 -> 0 at no cost in accuracy).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import Tensor, nn

from bdfast._utils import check_labelled_images, check_number, eval_mode, resolve_device

__all__ = ["evaluate", "der", "predict"]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Class predictions ``[N]`` (int64, on ``x``'s device) of ``model`` for ``x [N, C, H, W]``,
    computed batch by batch on the model's device in whatever mode the model is in."""
    device = resolve_device(None, model)
    out = [model(x[i:i + batch_size].to(device)).argmax(1).to(x.device)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, attack=None,
             batch_size: int = 256) -> Dict[str, float]:
    """ACC, and with an ``attack`` ASR and RA, of ``model`` on test images ``(x [N, C, H, W],
    y [N] int64)``; definitions in this module's docstring.

    Returns ``{"acc": float}`` or ``{"acc", "asr", "ra"}``. ASR and RA are NaN when no test image
    is eligible (e.g. every image is of the target class). The model runs in eval mode; every
    module's train/eval flag is restored afterwards.
    """
    check_labelled_images(model, x, y)
    if len(x) == 0:
        raise ValueError("x must hold at least one image, got an empty tensor")
    if attack is not None and not (hasattr(attack, "apply") and hasattr(attack, "target_labels")):
        raise TypeError("attack must be a bdfast.lab.attacks attack (with apply and target_labels) "
                        f"or None, got {type(attack).__name__}")
    check_number(batch_size, "batch_size", integer=True)

    with eval_mode(model):
        y = y.to(x.device)
        pred = predict(model, x, batch_size)
        result = {"acc": (pred == y).float().mean().item()}
        if attack is not None:
            num_classes = _num_outputs(model, x[:1])
            if int(y.max()) >= num_classes:
                raise ValueError(f"y must hold class indices below the model's {num_classes} "
                                 f"outputs, got {int(y.max())}")
            eligible = (torch.ones_like(y, dtype=torch.bool) if attack.all_to_all
                        else y != attack.target)
            if not bool(eligible.any()):
                result.update(asr=float("nan"), ra=float("nan"))
            else:
                ye = y[eligible]
                pred_t = torch.cat([predict(model, attack.apply(chunk), batch_size)
                                    for chunk in x[eligible].split(batch_size)])
                hit = pred_t == attack.target_labels(ye, num_classes)
                result["asr"] = hit.float().mean().item()
                result["ra"] = (pred_t == ye).float().mean().item()
    return result


@torch.no_grad()
def _num_outputs(model: nn.Module, x1: Tensor) -> int:
    return int(model(x1.to(resolve_device(None, model))).shape[1])


def der(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2.

    ``before`` and ``after`` are :func:`evaluate` results (mappings with "acc" and "asr").
    """
    for name, m in (("before", before), ("after", after)):
        if not isinstance(m, Mapping) or "acc" not in m or "asr" not in m:
            raise ValueError(f"{name} must be a mapping with 'acc' and 'asr' (an evaluate() "
                             f"result with an attack), got {m!r}")
    drop_asr = max(0.0, float(before["asr"]) - float(after["asr"]))
    drop_acc = max(0.0, float(before["acc"]) - float(after["acc"]))
    return (drop_asr - drop_acc + 1.0) / 2.0
