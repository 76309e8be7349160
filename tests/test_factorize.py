"""Each DESIGN §3 step of factorize.py on its own, against numpy or a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlaconvert.factorize import auto_dc


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.9, 0.999])
def test_auto_dc_is_the_cumulative_energy_threshold_rounded_up_to_16(energy):
    sigma = np.sort(np.random.default_rng(0).gamma(0.3, size=96))[::-1]
    share = np.cumsum(sigma**2) / np.sum(sigma**2)
    rank = int(np.argmax(share >= energy)) + 1
    assert auto_dc(torch.from_numpy(sigma.copy()), energy, dim=96) == min(96, max(16, 16 * int(np.ceil(rank / 16))))


def test_auto_dc_at_a_multiple_of_16_and_at_the_caps():
    sigma = torch.tensor([1.0] * 32 + [0.0] * 100, dtype=torch.float64)  # 32 equal values hold all the energy
    assert auto_dc(sigma, 1.0, dim=128) == 32
    assert auto_dc(sigma, 17 / 32, dim=128) == 32 and auto_dc(sigma, 16 / 32, dim=128) == 16
    assert auto_dc(sigma, 1.0, dim=24) == 24
