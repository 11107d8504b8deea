"""bdfast._utils: the helpers the trainer, the finetune baseline and the loaders share."""
from __future__ import annotations

import numpy as np
import torch

from bdfast._utils import seeded_generator, steps_per_epoch


def test_steps_per_epoch_leaves_out_only_a_trailing_batch_of_one():
    assert steps_per_epoch(64, 64) == 1
    assert steps_per_epoch(65, 64) == 1  # the 65th image alone would break BatchNorm
    assert steps_per_epoch(66, 64) == 2
    assert steps_per_epoch(3, 64) == 1
    assert steps_per_epoch(270, 64) == 5  # 4 full batches and one of 14


def test_seeded_generator_draws_the_same_order_for_the_same_seed_of_any_int_type():
    draws = [torch.randperm(50, generator=seeded_generator(seed)) for seed in (7, np.int64(7), 8)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    unseeded = [torch.randperm(50, generator=seeded_generator(None)) for _ in range(2)]
    assert not torch.equal(*unseeded)
