"""WanModel.from_pretrained / save_pretrained: any SOURCE in one line, and a round trip that changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlaconvert.checkpoints.builtin import TINY_WAN, make_tiny_wan
from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_model
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.model import WanModel, load_model


def forward(model: WanModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, TINY_WAN.in_dim, 3, 8, 8, generator=g)
    text = torch.randn(1, TINY_WAN.text_len, TINY_WAN.text_dim, generator=g)
    with torch.no_grad():
        return model(latents, torch.tensor([500.0]), text, chunk_frames=3)


@pytest.mark.parametrize("q_rank", [0, 96])  # 0: the dense model; 96: an MLA export with a low-rank query
def test_save_then_load_gives_the_same_model(tmp_path: Path, q_rank: int) -> None:
    if q_rank == 0:
        model = WanModel.from_pretrained("builtin:tiny-wan")
        assert not model.config.is_mla
        assert all(torch.equal(p, make_tiny_wan(0)[n]) for n, p in model.state_dict().items())
    else:
        mla = convert_model(load_source("builtin:tiny-wan"), ConvertSettings(dc=32, rope_dim=16, q_rank=q_rank, measure=False))
        model = load_model(mla.config, mla.state_dict)
    saved = model.save_pretrained(tmp_path / "m")
    again = WanModel.from_pretrained(str(saved))
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(forward(again), forward(model))
    # The folder is a SOURCE for every command, and is not overwritten by accident.
    assert load_source(str(saved)).config == model.config
    with pytest.raises(MlaconvertError, match="already exists"):
        model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m", force=True)
