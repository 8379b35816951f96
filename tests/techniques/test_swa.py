"""SWA: which steps are snapshotted, that the exported weights are their uniform average, state."""

from __future__ import annotations

import torch
from runs import technique, tiny_stack, tiny_trainer, token_shard

from pgolf.registry import TrainState
from pgolf.techniques.swa import SWA, SWAParams, accumulate_, should_snapshot


def test_snapshot_rule() -> None:
    assert should_snapshot(TrainState(step=100, lr_mult=0.3), 50, 0.4)
    assert not should_snapshot(TrainState(step=100, lr_mult=0.4), 50, 0.4)  # strictly below τ
    assert not should_snapshot(TrainState(step=101, lr_mult=0.1), 50, 0.4)


def test_accumulate_sums_in_fp32() -> None:
    total: dict[str, torch.Tensor] = {}
    a, b = torch.tensor([1.0, 2.0]).bfloat16(), torch.tensor([3.0, 5.0]).bfloat16()
    accumulate_(total, {"w": a})
    accumulate_(total, {"w": b})
    assert total["w"].dtype == torch.float32 and total["w"].tolist() == [4.0, 7.0]
    assert a.tolist() == [1.0, 2.0]  # the snapshot is a copy


def run_with_history(rs, shard):  # type: ignore[no-untyped-def]
    b, trainer = tiny_trainer(rs, shard)
    history: list[dict[str, torch.Tensor]] = []
    original = trainer.advance

    def advance(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        history.append({n: p.detach().clone() for n, p in b.model.named_parameters()})
        return out

    trainer.advance = advance  # type: ignore[method-assign]
    trainer.run()
    return b, trainer, history


def test_finalize_loads_the_uniform_average_of_the_snapshots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # linear warmdown over all 8 steps: step k runs at (8 − k)/8, so steps 5…8 end below 0.6
    rs = tiny_stack({"swa": {"interval": 2, "start_lr_scale": 0.6}},
                    train={"iterations": 8, "warmdown_iters": 8, "warmup_steps": 1})  # fmt: skip
    b, trainer, history = run_with_history(rs, token_shard(tmp_path))
    swa = technique(b, "swa")
    assert swa.steps == [6, 8] and swa.snapshots == 2
    trainer.finalize()
    for name, p in b.model.named_parameters():
        want = (history[5][name] + history[7][name]) / 2  # after steps 6 and 8
        assert torch.allclose(p.detach(), want, atol=1e-7), name
    changed = [n for n, _ in b.model.named_parameters() if not torch.equal(history[7][n], history[5][n])]
    assert changed  # the average is not simply the last weights


def test_without_a_snapshot_the_trained_weights_are_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"swa": {"interval": 1, "start_lr_scale": 0.5}}, train={"iterations": 3})
    b, trainer, history = run_with_history(rs, token_shard(tmp_path))
    trainer.finalize()
    assert technique(b, "swa").snapshots == 0
    assert all(torch.equal(p.detach(), history[-1][n]) for n, p in b.model.named_parameters())


def test_state_round_trips_and_restores_the_average() -> None:
    s = SWA(SWAParams(interval=1, start_lr_scale=1.0), None)  # type: ignore[arg-type]
    lin = torch.nn.Linear(3, 2)
    s.on_train_start()
    s.on_step(lin, TrainState(step=1, lr_mult=0.5))
    with torch.no_grad():
        lin.weight.add_(1.0)
    s.on_step(lin, TrainState(step=2, lr_mult=0.5))
    t = SWA(s.params, None)  # type: ignore[arg-type]
    t.load_state_dict(s.state_dict())
    assert t.snapshots == 2 and t.steps == [1, 2]
    assert torch.allclose(t.average()["weight"], lin.weight.detach() - 0.5)


def test_with_ema_the_average_of_ema_snapshots_is_exported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The declared rule for the pair: SWA snapshots the EMA weights and its average is exported."""
    from pgolf.techniques import ema as ema_module
    from pgolf.techniques import swa as swa_module

    assert swa_module.EMA_KEY == ema_module.SHARED_KEY
    rs = tiny_stack({"swa": {"interval": 2, "start_lr_scale": 0.6}, "ema": {"decay": 0.5}},
                    train={"iterations": 8, "warmdown_iters": 8})  # fmt: skip
    assert [r.name for r in rs.techniques][:2] == ["ema", "swa"]  # SWA runs after EMA
    b, trainer = tiny_trainer(rs, token_shard(tmp_path))
    ema, swa = technique(b, "ema"), technique(b, "swa")
    snaps: list[dict[str, torch.Tensor]] = []
    original = trainer.advance

    def advance(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        if trainer.state.step in (6, 8):
            snaps.append({n: t.clone() for n, t in ema.shadow.items()})
        return out

    trainer.advance = advance  # type: ignore[method-assign]
    trainer.run()
    assert swa.steps == [6, 8] and swa.source == "ema"
    trainer.finalize()
    for name, p in b.model.named_parameters():
        assert torch.allclose(p.detach(), (snaps[0][name] + snaps[1][name]) / 2, atol=1e-7), name
    assert any(not torch.equal(p.detach(), ema.shadow[n]) for n, p in b.model.named_parameters())


def test_with_ema_and_no_snapshot_the_ema_is_exported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"swa": {"interval": 1, "start_lr_scale": 0.01}, "ema": {"decay": 0.5}},
                    train={"iterations": 3})  # fmt: skip
    b, trainer = tiny_trainer(rs, token_shard(tmp_path))
    trainer.run()
    trainer.finalize()
    ema = technique(b, "ema")
    assert all(torch.equal(p.detach(), ema.shadow[n]) for n, p in b.model.named_parameters())
