"""magnitude_pruning and selective_pruning: each against a plain reference, the byte-target
search, and calibrated exports that reach the target and read back exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from runs import technique, tiny_stack, tiny_trainer, token_shard

from pgolf.registry.api.roles import param_infos
from pgolf.registry.run.export import export_model, write_artifact
from pgolf.techniques._rowquant import pack_codes
from pgolf.techniques.magnitude_pruning import prune
from pgolf.techniques.selective_pruning import candidates, pruned, search


def test_magnitude_pruning_zeroes_entries_below_the_tensors_quantile() -> None:
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    got = prune(w, 0.03)
    tau = np.quantile(np.abs(w.numpy()), 0.03)
    want = np.where(np.abs(w.numpy()) < tau, 0.0, w.numpy())
    assert np.array_equal(got.numpy(), want)
    assert int((got == 0).sum()) == int(np.ceil(0.03 * (1200 - 1)))  # the linear rule: 36 below τ


def test_magnitude_pruning_takes_large_matrices_in_scope_only() -> None:
    b, _ = tiny_trainer(
        tiny_stack({"magnitude_pruning": {"fraction": 0.5, "min_numel": 1000}}), token_shard_dummy()
    )
    state = {k: v.detach() for k, v in b.model.state_dict().items()}
    with torch.no_grad():
        for v in state.values():
            v.normal_()
    mp = technique(b, "magnitude_pruning")
    out = mp.float_state(state, param_infos(b.model))
    for name, t in out.items():
        big = t.ndim == 2 and t.numel() > 1000 and t.is_floating_point()
        zeros = float((t == 0).float().mean())
        assert (zeros >= 0.49) == big, name


def token_shard_dummy():  # type: ignore[no-untyped-def]
    import tempfile
    from pathlib import Path

    return token_shard(Path(tempfile.mkdtemp()))


def test_selective_pruning_candidates_are_the_plus_minus_one_codes_by_squared_step() -> None:
    q = torch.tensor([[1, -1, 2, 0], [-1, 3, 1, 1]], dtype=torch.float32)
    packed = {"tensors": {"a": {"data": pack_codes(q, torch.tensor([0.5, 0.25]), torch.tensor([3]),
                                                   torch.tensor([0.125, 0.0625]))}}}  # fmt: skip
    where, costs = candidates(packed, ["a"])
    assert where[0][1].tolist() == [0, 1, 4, 6, 7]  # flat positions of ±1
    assert costs.tolist() == [0.25, 0.25, 0.0625, 0.0625, 0.0625**2]  # column 3 has its own step
    order = torch.sort(costs, stable=True).indices
    out = pruned(packed, where, order, 2)
    assert out["tensors"]["a"]["data"]["q"].tolist() == [[1, -1, 2, 0], [0, 3, 1, 0]]
    assert packed["tensors"]["a"]["data"]["q"].tolist()[1] == [-1, 3, 1, 1]  # the input is untouched


@pytest.mark.parametrize("target", [0, 5, 137, 999, 1000, 1500])
def test_search_finds_the_smallest_count_that_fits(target: int) -> None:
    sizes = [1000 - (k * k) // 40 for k in range(201)]  # falls ever faster, 1000 → 0
    calls: list[int] = []

    def size(k: int) -> int:
        calls.append(k)
        return sizes[k]

    n, got, probes = search(size, 200, target, 64)
    want = next(k for k in range(201) if sizes[k] <= target) if target < 1000 else 0
    assert n == want and got == sizes[n] and probes == len(calls) <= 64


def test_selective_pruning_reaches_a_byte_target_on_a_real_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_stack({"gptq": {"bits": 5}, "zstd": {"level": 3}}, train={"iterations": 2},
                      export={"passthrough_max_numel": 0})  # fmt: skip
    b, trainer = tiny_trainer(base, token_shard(tmp_path))
    trainer.run()
    full = len(export_model(b.model, b.sites, base.stack.export).blob)
    target = full - 300
    rs = tiny_stack({"gptq": {"bits": 5}, "zstd": {"level": 3}, "selective_pruning": {"target_bytes": target}},
                    train={"iterations": 2}, export={"passthrough_max_numel": 0})  # fmt: skip
    b2, trainer2 = tiny_trainer(rs, token_shard(tmp_path))
    trainer2.run()
    size = write_artifact(tmp_path / "m.ptz", b2.model, b2.sites, rs.stack.export)  # exact read-back
    rep = technique(b2, "selective_pruning").report
    assert size == rep["bytes"] <= target and 0 < rep["pruned"] < rep["candidates"]


def test_the_size_estimate_stops_gptqs_allowance_at_the_pruning_target() -> None:
    """GPTQ's size_allowance covers trained codes compressing worse than the stand-ins'; with
    selective pruning the export prunes to target_bytes whatever the codes, so the estimate never
    exceeds the target it reached (and says how much of the stand-ins it pruned)."""
    from pgolf.registry.run.pipeline import estimate_artifact_bytes

    techniques: dict[str, Any] = {"gptq": {"bits": 5, "calibration_batches": 1}, "zstd": {"level": 3}}
    plain = estimate_artifact_bytes(tiny_stack(techniques, export={"passthrough_max_numel": 0}))
    assert plain.allowance > 0
    blob = plain.model_bytes - plain.allowance
    roomy = blob + plain.allowance // 2  # the stand-ins fit without pruning; the allowance would not
    est = estimate_artifact_bytes(
        tiny_stack(
            {**techniques, "selective_pruning": {"target_bytes": roomy}}, export={"passthrough_max_numel": 0}
        )
    )
    assert est.model_bytes == roomy and est.allowance == roomy - blob
    assert "selective_pruning: the stand-in weights needed no pruning to reach" in est.method
    tight = blob - 200  # the stand-ins are pruned to the target: no allowance on top
    est = estimate_artifact_bytes(
        tiny_stack(
            {**techniques, "selective_pruning": {"target_bytes": tight}}, export={"passthrough_max_numel": 0}
        )
    )
    assert est.model_bytes <= tight and est.allowance == tight - (est.model_bytes - est.allowance)
    assert "selective_pruning: zeroed" in est.method and "stand-in weights" in est.method
