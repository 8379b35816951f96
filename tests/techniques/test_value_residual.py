"""Value residual: the values reaching attention against λ0·v_first + λ1·v computed from the raw
projections, λ placement by schedule, learning, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_build

from pgolf.registry import PgolfError, Role
from pgolf.registry.api.roles import layer_of, role_of
from pgolf.techniques.value_residual import ValueResidual


def lambdas(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    out = {}
    for block in model.blocks:
        mods = [m for m in block.attn.qkv if isinstance(m, ValueResidual)]
        assert len(mods) == 1
        if mods[0].lambdas is not None:
            out[block.layer] = mods[0].lambdas
    return out


def test_attention_sees_the_mix_of_first_and_own_raw_values() -> None:
    model = tiny_build(
        {"value_residual": {"lambda_first_init": 0.3, "lambda_own_init": 0.9}}, num_layers=3
    ).model
    for name, p in model.named_parameters():
        if "lambdas" not in name:
            torch.nn.init.normal_(p, std=0.2)
    raw: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.c_v.register_forward_hook(lambda m, a, out: raw.append(out.detach()))
        block.attn.kernel.register_forward_pre_hook(lambda m, a: seen.append(a[2].detach()))
    with torch.no_grad():
        model.logits(torch.randint(0, 64, (2, 16)))
    shape = seen[0].shape
    first = raw[0].view(shape)
    assert torch.equal(seen[0], first)  # the first layer provides v_first and does not mix
    for layer in (1, 2):
        expected = 0.3 * first + 0.9 * raw[layer].view(shape)
        assert torch.allclose(seen[layer], expected, atol=1e-6)


def test_lambdas_on_selected_layers_that_always_run_after_the_first_block() -> None:
    lams = lambdas(tiny_build({"value_residual": {}}, num_layers=4).model)
    assert sorted(lams) == [1, 2, 3]
    for layer, lam in lams.items():
        assert role_of(lam) == Role.SCALAR and layer_of(lam) == layer
        assert lam.tolist() == [0.5, 0.5]
    assert sorted(lambdas(tiny_build({"value_residual": {"layers": [0, 2]}}, num_layers=4).model)) == [2]
    # looped order 0,1,0,1: layer 0 runs later only after the switch, so it never gets λ (DDP-safe)
    looped = {"depth_recurrence": {"encoder": [0, 1], "decoder": [0, 1]}, "value_residual": {}}
    assert sorted(lambdas(tiny_build(looped).model)) == [1]


def test_lambdas_learn() -> None:
    model = tiny_build({"value_residual": {}}, num_layers=3).model
    for name, p in model.named_parameters():
        if "lambdas" not in name:
            torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    for lam in lambdas(model).values():
        assert lam.grad is not None and lam.grad.abs().sum() > 0


def test_no_layer_to_mix_is_an_error() -> None:
    with pytest.raises(PgolfError, match=r"value_residual.layers=\[0\] selects no layer"):
        tiny_build({"value_residual": {"layers": [0]}}, num_layers=3)
