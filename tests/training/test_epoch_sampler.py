"""What an epoch draws: ``training.epoch_images`` and ``training.empty_image_weight``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dicom_node.common.errors import ConfigError
from dicom_node.training.config import TrainSettings
from dicom_node.training.train import epoch_sampler

N_IMAGES, N_EMPTY = 40, 8


def _masks() -> np.ndarray:
    """40 images' masks (N, 1, 4, 4): the first 8 empty, the others with a pixel set."""
    masks = np.zeros((N_IMAGES, 1, 4, 4), np.uint8)
    masks[N_EMPTY:, 0, 1, 1] = 1
    return masks


def _empty_share(settings: TrainSettings, epochs: int = 200) -> float:
    sampler = epoch_sampler(_masks(), settings, torch.Generator().manual_seed(0))
    drawn = [i for _ in range(epochs) for i in sampler]
    return sum(i < N_EMPTY for i in drawn) / len(drawn)


def test_empty_images_are_drawn_as_often_as_their_weight_says() -> None:
    base = TrainSettings(epoch_images=10)
    even = _empty_share(base)
    heavy = _empty_share(dataclasses.replace(base, empty_image_weight=4.0))
    # 8 of 40 images: 20% of draws when alike; weighted 4x, well above (about 46% for a
    # draw of 10 without replacement); never a repeat within an epoch
    assert 0.15 < even < 0.25
    assert heavy > 0.38
    sampler = epoch_sampler(
        _masks(), dataclasses.replace(base, empty_image_weight=4.0), torch.Generator()
    )
    epoch = list(sampler)
    assert len(epoch) == 10 and len(set(epoch)) == 10


def test_the_draw_follows_the_generator_so_a_resumed_run_draws_the_same() -> None:
    settings = TrainSettings(epoch_images=10, empty_image_weight=3.0)
    generator = torch.Generator().manual_seed(5)
    sampler = epoch_sampler(_masks(), settings, generator)
    list(sampler)
    state = generator.get_state()
    second = list(sampler)
    generator.set_state(state)
    assert list(sampler) == second


def test_weight_one_keeps_the_plain_draw_of_earlier_runs() -> None:
    """At 1.0 the draw is the one runs before the setting had (a resumed checkpoint of such a
    run goes on with the same images)."""
    plain = torch.utils.data.RandomSampler(
        range(N_IMAGES), num_samples=10, generator=torch.Generator().manual_seed(3)
    )
    ours = epoch_sampler(_masks(), TrainSettings(epoch_images=10), torch.Generator().manual_seed(3))
    assert list(ours) == list(plain)


@pytest.mark.parametrize("weight", [0, -1.0])
def test_a_weight_that_is_not_positive_is_refused(weight: float) -> None:
    with pytest.raises(ConfigError, match="empty_image_weight must be > 0"):
        TrainSettings.from_dict({"empty_image_weight": weight})
