"""The fixed vocabulary of hooks a technique may implement.

A hook is a method of a technique marked with :func:`pgolf.registry.hook`. Its parameters
must be a subset of the hook's arguments (pluggy-style: an implementation takes only what it
uses); the runner calls it with keyword arguments. Each hook is either

* **additive**: every technique in the stack that implements it runs, in resolved order; or
* **exclusive**: it belongs to a *slot* that exactly one technique fills (the quantizer, the
  codec). A slot left empty by the stack is filled by its default technique.

``mlp_act`` is exclusive per layer: two techniques may not both replace the MLP activation of
the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HookSpec:
    name: str
    args: tuple[str, ...]
    kind: str  # "additive" | "exclusive" | "per-layer exclusive"
    doc: str
    slot: str | None = None


HOOKS: dict[str, HookSpec] = {
    h.name: h
    for h in (
        # -- model build: return an nn.Module to place in a named slot of the base model, or None.
        HookSpec(
            "embed",
            (),
            "additive",
            "module m(x, idx) -> x applied to the token embedding (B,T,D) before the input RMSNorm",
        ),
        HookSpec(
            "attn_out",
            ("layer",),
            "additive",
            "module m(y, v) -> y applied in layer `layer` to the per-head attention output "
            "y (B,T,H,D), with that layer's values v (B,T,KV,D), before the output projection",
        ),
        HookSpec(
            "mlp_act",
            ("layer",),
            "per-layer exclusive",
            "module m(u) -> u replacing the MLP activation (relu²) of layer `layer`",
        ),
        # -- training
        HookSpec("on_train_start", ("model",), "additive", "after compile warm-up, before step 1"),
        HookSpec("on_step_end", ("model", "step"), "additive", "after every optimizer step"),
        HookSpec("finalize", ("model",), "additive", "after training, before export (e.g. swap in EMA)"),
        # -- export: exclusive slots
        HookSpec(
            "quantize",
            ("state", "roles"),
            "exclusive",
            "state dict + parameter roles -> packed object for torch.save",
            slot="quantizer",
        ),
        HookSpec(
            "dequantize", ("packed",), "exclusive", "packed object -> float state dict", slot="quantizer"
        ),
        HookSpec("compress", ("data",), "exclusive", "bytes -> compressed bytes", slot="codec"),
        HookSpec("decompress", ("data",), "exclusive", "compressed bytes -> bytes", slot="codec"),
    )
}

SLOTS: dict[str, tuple[str, ...]] = {}
for _h in HOOKS.values():
    if _h.slot:
        SLOTS.setdefault(_h.slot, ())
        SLOTS[_h.slot] = (*SLOTS[_h.slot], _h.name)

SLOT_DEFAULTS: dict[str, str] = {"quantizer": "int8_rowwise", "codec": "zlib"}
"""The technique that fills a slot when the stack names none (the challenge baseline's choice)."""
