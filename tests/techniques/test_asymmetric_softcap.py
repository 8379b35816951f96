"""Asymmetric softcap: the maths against a per-element formula, equal caps give the baseline's
softcap, the caps train, and the head works with untied embeddings."""

from __future__ import annotations

import math

import torch
from conftest import tiny_build

from pgolf.registry.run.model import softcap
from pgolf.techniques.asymmetric_softcap import AsymmetricSoftcapHead, asymmetric_softcap


def test_matches_the_per_element_formula() -> None:
    z = torch.tensor([-200.0, -31.0, -1.0, -1e-3, 0.0, 1e-3, 2.0, 40.0, 500.0])
    out = asymmetric_softcap(z, 12.0, 40.0)
    for a, b in zip(z.tolist(), out.tolist()):
        c = 12.0 if a > 0 else 40.0
        assert math.isclose(b, c * math.tanh(a / c), rel_tol=1e-6, abs_tol=1e-7)
    assert out.max() <= 12.0 and out.min() >= -40.0
    same = torch.randn(3, 7) * 50
    assert torch.allclose(asymmetric_softcap(same, 30.0, 30.0), softcap(same, 30.0))


def test_caps_are_learned_unless_fixed_and_the_head_works_untied() -> None:
    for tied in (True, False):
        b = tiny_build({"asymmetric_softcap": {"positive": 5.0, "negative": 9.0}}, tie_embeddings=tied)
        head = b.model.head
        assert isinstance(head, AsymmetricSoftcapHead)
        with torch.no_grad():
            for p in b.model.parameters():
                p.normal_(std=1.0)
        idx = torch.randint(0, 64, (2, 8))
        logits = b.model.logits(idx)
        assert logits.max() < 5.0 and logits.min() > -9.0
        b.model(idx, idx).backward()
        assert head.caps.grad is not None and head.caps.grad.abs().min() > 0
    fixed = tiny_build({"asymmetric_softcap": {"trainable": False}}).model.head
    assert not list(fixed.parameters()) and fixed.caps.tolist() == [30.0, 30.0]
