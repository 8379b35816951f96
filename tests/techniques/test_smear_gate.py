"""SmearGate: both variants against per-position loops, the BOS fix, identity at init, placement."""

from __future__ import annotations

import torch
from conftest import tiny_build

from pgolf.registry import Ctx
from pgolf.techniques.smear_gate import SmearGateModule, SmearGateParams

BOS = 1


def reference(x: torch.Tensor, idx: torch.Tensor, mod: SmearGateModule, bos_fix: bool) -> torch.Tensor:
    out = x.clone()
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            keep = t > 0 and not (bos_fix and int(idx[b, t]) == BOS)
            prev = x[b, t - 1] if keep else torch.zeros_like(x[b, t])
            if mod.variant == "input":
                gate = 1.0 / (1.0 + torch.exp(-sum(x[b, t, i] * mod.w[i] for i in range(mod.w.numel()))))
                out[b, t] = x[b, t] + mod.lam * gate * prev
            else:
                s = 1.0 / (1.0 + torch.exp(-mod.g))
                out[b, t] = (1 - s) * x[b, t] + s * prev
    return out


def test_both_variants_match_the_per_position_reference_with_and_without_the_bos_fix() -> None:
    torch.manual_seed(0)
    idx = torch.tensor([[5, 7, BOS, 9, 3, BOS], [BOS, 4, 4, 8, BOS, 2]])
    x = torch.randn(2, 6, 16)
    for variant in ("input", "static"):
        for bos_fix in (True, False):
            mod = SmearGateModule(SmearGateParams(variant=variant, width=5, bos_fix=bos_fix), 16)
            with torch.no_grad():
                for p in mod.parameters():
                    p.normal_()
            out = mod(x, Ctx(idx))
            assert torch.allclose(out, reference(x, idx, mod, bos_fix), atol=1e-5), (variant, bos_fix)


def test_nothing_crosses_a_document_boundary() -> None:
    """Changing the last token of document 1 leaves every position of document 2 as it was."""
    torch.manual_seed(1)
    for variant in ("input", "static"):
        mod = SmearGateModule(SmearGateParams(variant=variant), 16)
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_()
        idx = torch.tensor([[BOS, 5, 6, BOS, 8, 9]])
        x = torch.randn(1, 6, 16)
        y = x.clone()
        y[0, 2] += 5.0  # the last token of the first document
        a, b = mod(x, Ctx(idx)), mod(y, Ctx(idx))
        assert torch.equal(a[0, 3:], b[0, 3:]), variant
        assert not torch.allclose(a[0, 2], b[0, 2])


def test_input_variant_is_the_identity_at_init_and_learns() -> None:
    mod = SmearGateModule(SmearGateParams(), 16)
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = mod(x, Ctx(torch.randint(2, 50, (2, 6))))
    assert torch.equal(out, x)
    out.square().sum().backward()
    assert mod.lam.grad is not None and mod.lam.grad.abs() > 0  # λ trains first, then w
    assert sum(p.numel() for p in mod.parameters()) == 13  # W = 12 plus λ


def test_fills_the_embed_chain_after_bigram_hash() -> None:
    b = tiny_build({"smear_gate": {}, "bigram_hash": {"buckets": 64, "dim": 8}})
    assert [t.name for t in b.techniques][:2] == ["bigram_hash", "smear_gate"]
    assert isinstance(b.model.embed[1], SmearGateModule)
