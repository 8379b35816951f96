"""cosine_lr: the multiplier against its closed form, by steps and by wall clock, in the trainer."""

from __future__ import annotations

import math

import pytest
from runs import tiny_stack, tiny_trainer, token_shard

from pgolf.registry import PgolfError, TrainState
from pgolf.registry.run.train import Progress
from pgolf.techniques.cosine_lr import CosineLR, CosineLRParams, cosine_multiplier


@pytest.mark.parametrize("final", [0.0, 0.1, 0.5])
def test_multiplier_is_a_half_cosine_from_one_to_final(final: float) -> None:
    for i in range(21):
        f = i / 20
        want = final + (1 - final) * math.cos(math.pi * f / 2) ** 2  # ½(1 + cos πf) = cos²(πf/2)
        assert cosine_multiplier(f, final) == pytest.approx(want, abs=1e-12)
    assert cosine_multiplier(0.0, final) == 1.0
    assert cosine_multiplier(1.0, final) == pytest.approx(final)
    assert cosine_multiplier(0.5, final) == pytest.approx((1 + final) / 2)
    assert cosine_multiplier(1.7, final) == pytest.approx(final)  # past the end: held at final


def test_schedule_reads_the_wall_clock_fraction() -> None:
    mult = CosineLR(CosineLRParams(final=0.2), None).lr_schedule()  # type: ignore[arg-type]
    by_clock = TrainState(step=10, iterations=1000, elapsed=30.0, max_seconds=60.0)
    assert by_clock.fraction == 0.5
    assert mult(by_clock) == pytest.approx(0.6)
    by_steps = TrainState(step=750, iterations=1000)
    assert mult(by_steps) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(0.75 * math.pi)))


def test_trainer_uses_it_for_every_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"cosine_lr": {"final": 0.1}}, train={"iterations": 4, "warmdown_iters": 2})
    _, trainer = tiny_trainer(rs, token_shard(tmp_path))
    seen: list[Progress] = []
    trainer.run(on_progress=seen.append)
    assert [p.lr_mult for p in seen] == pytest.approx([cosine_multiplier(k / 4, 0.1) for k in range(4)])


def test_conflicts_with_warmdown_fraction() -> None:
    with pytest.raises(PgolfError, match="conflicts with technique 'warmdown_fraction'"):
        tiny_stack({"cosine_lr": {}, "warmdown_fraction": {}})
