"""progressive_context: the length schedule, the re-warm-up, warm-up shapes and the trainer."""

from __future__ import annotations

import re

import pytest
from runs import technique, tiny_stack, tiny_trainer, token_shard

from pgolf.registry import PgolfError
from pgolf.techniques.progressive_context import ProgressiveContextParams, length_at, rewarm_factor


def test_length_follows_the_boundaries() -> None:
    lengths, bounds = (1024, 2048, 3072), (0.1, 0.7)
    for f, want in ((0.0, 1024), (0.0999, 1024), (0.1, 2048), (0.5, 2048), (0.7, 3072), (1.0, 3072)):
        assert length_at(f, lengths, bounds) == want


def test_rewarm_is_linear_over_r_steps_after_a_switch() -> None:
    assert [rewarm_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert rewarm_factor(None, 4) == 1.0 and rewarm_factor(0, 0) == 1.0


def test_params_are_checked() -> None:
    for bad, words in (({"lengths": [2048, 1024], "boundaries": [0.5]}, "increasing"),
                       ({"lengths": [8, 16], "boundaries": []}, "2 lengths need 1 boundaries"),
                       ({"lengths": [8, 16], "boundaries": [1.0]}, "fractions in (0, 1)")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)):
            ProgressiveContextParams.model_validate(bad)


def test_trainer_switches_lengths_rewarms_and_compiles_every_length(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"progressive_context": {"lengths": [4, 8, 16], "boundaries": [0.25, 0.5], "rewarm_steps": 2}},
                    train={"iterations": 8, "warmup_steps": 1})  # fmt: skip
    b, trainer = tiny_trainer(rs, token_shard(tmp_path))
    assert sorted({n for _, n in trainer.warm_up_states()}) == [4, 8, 16]
    seen: list[tuple[int, int, float]] = []
    step = trainer.step

    def spy(state):  # type: ignore[no-untyped-def]
        out = step(state)
        if state is not trainer.state:  # a compile warm-up step
            return out
        lr = (
            trainer.opt.optimizers[-1].param_groups[0]["lr"]
            / trainer.opt.optimizers[-1].param_groups[0]["base_lr"]
        )
        seen.append((state.step, state.seq_len, round(lr / state.lr_mult, 6)))
        return out

    trainer.step = spy  # type: ignore[method-assign]
    trainer.run()
    # steps 0-1 at 4 tokens (f < 0.25), 2-3 at 8, 4-7 at 16; a 2-step re-warm-up after each switch
    assert [(s, n) for s, n, _ in seen] == [
        (0, 4),
        (1, 4),
        (2, 8),
        (3, 8),
        (4, 16),
        (5, 16),
        (6, 16),
        (7, 16),
    ]
    assert [r for _, _, r in seen] == [1.0, 1.0, 0.5, 1.0, 0.5, 1.0, 1.0, 1.0]
    assert technique(b, "progressive_context").state_dict() == {"current": 16, "switched_at": 4}


def test_a_length_past_the_training_length_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"progressive_context": {"lengths": [16, 32], "boundaries": [0.5]}})
    with pytest.raises(PgolfError, match="reaches 32, more than train.train_seq_len=16"):
        tiny_trainer(rs, token_shard(tmp_path))
