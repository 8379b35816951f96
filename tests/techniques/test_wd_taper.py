"""wd_taper: the multiplier against its definition, and the decay the optimizers apply."""

from __future__ import annotations

import pytest
import torch
from runs import tiny_stack, tiny_trainer, token_shard

from pgolf.registry import TrainState
from pgolf.techniques.wd_taper import taper_multiplier


def test_flat_then_linear_to_the_final_factor() -> None:
    for i in range(101):
        f = i / 100
        want = 1.0 if f < 0.7 else 1.0 + (0.5 - 1.0) * (f - 0.7) / 0.3
        assert taper_multiplier(f, 0.7, 0.5) == pytest.approx(want)
    assert taper_multiplier(0.85, 0.7, 0.5) == pytest.approx(0.75)
    assert taper_multiplier(1.0, 0.7, 0.5) == pytest.approx(0.5)
    assert taper_multiplier(2.0, 0.0, 0.0) == 0.0 and taper_multiplier(-1.0, 0.2, 0.0) == 1.0


def test_every_group_decays_by_the_tapered_weight_decay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"wd_taper": {"start_fraction": 0.5, "final": 0.0}},
                    optim={"matrix_wd": 0.1, "scalar_wd": 0.2}, train={"iterations": 10})  # fmt: skip
    _, trainer = tiny_trainer(rs, token_shard(tmp_path))
    state = TrainState(step=9, iterations=10)  # f = 0.9: multiplier 0.2
    trainer.step(state)
    wds = {g["base_wd"]: g["weight_decay"] for opt in trainer.opt.optimizers for g in opt.param_groups}
    assert wds[0.1] == pytest.approx(0.02) and wds[0.2] == pytest.approx(0.04)
    assert torch.isfinite(torch.tensor(list(wds.values()))).all()
