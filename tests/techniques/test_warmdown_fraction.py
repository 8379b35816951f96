"""warmdown_fraction: the multiplier against its definition, the time reserve it sees, the trainer."""

from __future__ import annotations

import pytest
from runs import tiny_stack, tiny_trainer, token_shard

from pgolf.registry import TrainState
from pgolf.registry.run.train import Progress
from pgolf.techniques.warmdown_fraction import (
    WarmdownFraction,
    WarmdownFractionParams,
    warmdown_multiplier,
)


@pytest.mark.parametrize(("w", "floor"), [(0.85, 0.1), (0.5, 0.0), (1.0, 0.2), (0.2, 0.0)])
def test_multiplier_is_flat_then_linear_to_the_floor(w: float, floor: float) -> None:
    for i in range(101):
        f = i / 100
        want = min(1.0, max(floor, (1 - f) / w))  # the same curve written as one clamp
        assert warmdown_multiplier(f, w, floor) == pytest.approx(want, abs=1e-12)
    assert warmdown_multiplier(1 - w - 1e-9, w, floor) == 1.0
    assert warmdown_multiplier(1 - w / 2, w, floor) == pytest.approx(max(0.5, floor))
    assert warmdown_multiplier(1.0, w, floor) == floor


def test_fraction_is_taken_inside_the_cap_minus_the_time_reserve(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack(
        {"warmdown_fraction": {"fraction": 0.5, "min_lr": 0.0}, "gptq": {"reserve_seconds": 8}},
        train={"max_wallclock_seconds": 60, "iterations": 10_000},
    )
    _, trainer = tiny_trainer(rs, token_shard(tmp_path))
    state = trainer.new_state()
    assert state.max_seconds == 52.0
    state.step, state.elapsed = 10, 39.0  # 75 % of the 52 s left for training
    assert trainer.lr_schedule(state) == pytest.approx(0.5)
    state.elapsed = 26.0
    assert trainer.lr_schedule(state) == 1.0


def test_schedule_by_steps_without_a_cap() -> None:
    mult = WarmdownFraction(WarmdownFractionParams(fraction=0.75, min_lr=0.1), None).lr_schedule()  # type: ignore[arg-type]
    assert mult(TrainState(step=200, iterations=1000)) == 1.0
    assert mult(TrainState(step=625, iterations=1000)) == pytest.approx(0.5)
    assert mult(TrainState(step=990, iterations=1000)) == pytest.approx(0.1)


def test_trainer_uses_it_for_every_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"warmdown_fraction": {"fraction": 0.5, "min_lr": 0.3}}, train={"iterations": 6})
    _, trainer = tiny_trainer(rs, token_shard(tmp_path))
    seen: list[Progress] = []
    trainer.run(on_progress=seen.append)
    assert [p.lr_mult for p in seen] == pytest.approx([1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3])


def test_iters_form_is_the_baseline_warmdown_with_a_floor() -> None:
    from pgolf.registry.run.optim import lr_multiplier

    mult = WarmdownFraction(WarmdownFractionParams(iters=300, min_lr=0.2), None).lr_schedule()  # type: ignore[arg-type]
    for step in (0, 699, 700, 850, 940, 1000):
        base = lr_multiplier(step, 0.0, iterations=1000, warmdown_iters=300, max_wallclock_seconds=0)
        assert mult(TrainState(step=step, iterations=1000)) == pytest.approx(max(base, 0.2))
    assert mult(TrainState(step=850, iterations=1000)) == pytest.approx(0.5)
    # by wall clock: 10 s per step so far, 300 steps = 3000 s of warmdown before the 5000 s cap
    capped = TrainState(step=300, elapsed=3000.0, iterations=10**6, max_seconds=5000.0)
    assert mult(capped) == pytest.approx(2000 / 3000)
    capped.elapsed = 4900.0
    assert mult(capped) == 0.2
    with pytest.raises(ValueError, match="fraction or iters, not both"):
        WarmdownFractionParams(fraction=0.5, iters=100)
