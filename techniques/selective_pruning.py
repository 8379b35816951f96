"""Selective ±1 pruning: after quantization, zero the cheapest ±1 codes until the artifact fits a
byte target.

What: candidates are the codes equal to ±1 in every row-wise quantized tensor (``rtn``, ``gptq``,
``int8_rowwise`` matrices) of ``scope``; zeroing one costs its squared step s² (the row's scale,
or an AWQ-lite column's). Candidates are sorted by cost (ascending, ties in tensor and position
order) and the first n are zeroed, with n the smallest count for which the artifact (serializer,
byte transforms, codec: the real ones, through ``measure``) is at most ``target_bytes``. n is found
by interpolation search on the measured size (bisection when two probes in a row land on the
same side; at most ``max_probes`` full compressions; the count is resolved to 0.01 % of the
candidates), keeping the last count known to fit. Nothing is pruned when the artifact already fits; every candidate is
pruned, with a warning in the run log, when even that does not reach the target.

Why: a few hundred kilobytes over the cap cost the cheapest codes instead of a smaller model;
zeroed ±1 codes make the code stream more compressible at the least squared error.

Source: parameter-golf ``R/2026-03-25`` (from PR #609; LZMA-9 size + code ≤ 15.9 MiB). SDClip
records report needing none.

Sites: the ``post_quant`` chain (``post_quantize``); the pruned codes are stored as they are, so
nothing is undone at load.

Interactions: runs after ``lqer`` (``after``), whose factors count toward the bytes. The counted
code is not known to the export: ``target_bytes`` is the model file alone (leave room for the code
bytes ``pgolf check`` prints). Each probe compresses the whole model: with brotli-11 or lzma-9 on a
16 MB model that is about a minute per probe. The size estimate runs it too, so a stack with this
technique is estimated at (about) its target: the estimate's allowance for calibration-dependent
codes (GPTQ's ``size_allowance``) stops at the target, which the export enforces whatever the
trained codes, and the estimate says how many of the stand-ins' ±1 codes it had to zero.

Evidence (records, 8×H100): part of ``R/2026-03-25`` (no isolated number). Not yet measured
with pgolf.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Params, Technique, Tensors, TensorScope, hook, register
from pgolf.techniques._rowquant import code_steps, is_rowwise


class SelectivePruningParams(Params):
    target_bytes: int = Field(
        15_900_000, ge=1, description="model file bytes to reach (code bytes not included)"
    )
    scope: Tensors = Field(TensorScope.parse("all"), description="kinds/roles whose ±1 codes may be zeroed")
    max_probes: int = Field(16, ge=2, le=64, description="full compressions the search may take")


def candidates(packed: Mapping[str, Any], names: list[str]) -> tuple[list[tuple[str, Tensor]], Tensor]:
    """The ±1 codes of the named row-wise entries: [(name, flat indices)] and their costs s²
    (one tensor, in the same order: tensor by tensor, position by position)."""
    where: list[tuple[str, Tensor]] = []
    costs: list[Tensor] = []
    for name in names:
        data = packed["tensors"][name]["data"]
        q = data["q"].reshape(-1)
        idx = torch.nonzero(q.abs() == 1).reshape(-1)
        where.append((name, idx))
        costs.append(code_steps(data).reshape(-1)[idx].double().square())
    return where, (torch.cat(costs) if costs else torch.zeros(0, dtype=torch.float64))


def pruned(
    packed: Mapping[str, Any], where: list[tuple[str, Tensor]], order: Tensor, n: int
) -> dict[str, Any]:
    """A copy of ``packed`` with the first ``n`` candidates of ``order`` zeroed."""
    out = dict(packed)
    out["tensors"] = dict(packed["tensors"])
    chosen = order[:n]
    start = 0
    for name, idx in where:
        mine = chosen[(chosen >= start) & (chosen < start + idx.numel())] - start
        start += idx.numel()
        if not mine.numel():
            continue
        entry = copy.copy(out["tensors"][name])
        data = dict(entry["data"])
        q = data["q"].clone()
        q.view(-1)[idx[mine]] = 0
        data["q"] = q
        entry["data"] = data
        out["tensors"][name] = entry
    return out


def search(size: Callable[[int], int], total: int, target: int, max_probes: int) -> tuple[int, int, int]:
    """The smallest n in [0, total] with size(n) ≤ target, assuming size falls as n grows: found
    by interpolation between the last count over and the last count under the target. Returns
    (n, size(n), probes); n = total when even that is over."""
    lo, s_lo = 0, size(0)
    if s_lo <= target:
        return 0, s_lo, 1
    hi, s_hi = total, size(total)
    probes = 2
    if s_hi > target:
        return total, s_hi, probes
    sides: list[bool] = []
    while hi - lo > max(1, total // 10_000) and probes < max_probes:
        if len(sides) >= 2 and sides[-1] == sides[-2]:  # one-sided: bisect instead
            mid = (lo + hi) // 2
        else:
            mid = lo + round((s_lo - target) / max(s_lo - s_hi, 1) * (hi - lo))
        mid = min(max(mid, lo + 1), hi - 1)
        s_mid = size(mid)
        probes += 1
        sides.append(s_mid <= target)
        if sides[-1]:
            hi, s_hi = mid, s_mid
        else:
            lo, s_lo = mid, s_mid
    return hi, s_hi, probes


@register("selective_pruning")
class SelectivePruning(Technique):
    """Selective ±1 pruning: after quantization, zero the cheapest ±1 codes until the artifact fits a
    byte target."""

    Params = SelectivePruningParams
    params: SelectivePruningParams
    after = ("lqer",)
    contract_params: ClassVar[dict[str, Any]] = {"target_bytes": 1}  # prune everything it can

    def __init__(self, params: SelectivePruningParams, spec: Any):
        super().__init__(params, spec)
        self.report: dict[str, int] = {}

    def size_cap(self) -> int | None:
        """The export prunes until the model file is at most ``target_bytes``, whatever the trained
        codes: the size estimate's allowance for them stops there (when the stand-ins reach it)."""
        return self.params.target_bytes

    def size_cap_note(self, capped: bool) -> str:
        """How many of the stand-in weights' ±1 codes the size estimate's export zeroed."""
        pruned = self.report.get("pruned", 0)
        if pruned:
            return f"zeroed {pruned:,} of {self.report.get('candidates', 0):,} ±1 codes of the stand-in weights to reach"
        return "the stand-in weights needed no pruning to reach" if capped else ""

    @hook
    def post_quantize(
        self,
        packed: dict[str, Any],
        infos: dict[str, ParamInfo],
        measure: Callable[[Mapping[str, Any]], int],
    ) -> dict[str, Any]:
        p = self.params
        names = [
            n
            for n, e in packed["tensors"].items()
            if n in infos and p.scope.contains(infos[n]) and is_rowwise(e.get("data", {}))
        ]
        where, costs = candidates(packed, names)
        order = torch.sort(costs, stable=True).indices
        n, size, probes = search(lambda k: measure(pruned(packed, where, order, k)), costs.numel(), p.target_bytes,
                                 p.max_probes)  # fmt: skip
        self.report = {"candidates": int(costs.numel()), "pruned": n, "bytes": size, "probes": probes}
        if n:
            self.log(f"zeroed {n:,} of {costs.numel():,} ±1 codes: {size:,} bytes ({probes} probes)")
        if size > p.target_bytes:
            self.log(f"warning: {size:,} bytes with every ±1 code zeroed, over the {p.target_bytes:,} target")
        return pruned(packed, where, order, n) if n else packed
