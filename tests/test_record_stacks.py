"""The reference stacks of the published records (stacks/pr*.yaml): each resolves, orders its
techniques and counts the published number of parameters; each runs end to end on the CPU scaled
down with --set (its evaluation techniques and the legality probes included); the two
``_as_published`` variants are flagged not legal, the others legal."""

from __future__ import annotations

from conftest import tiny_stack

from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.pipeline import dry_build


def test_evaluation_adapters_are_not_counted_as_model_parameters() -> None:
    """LoRA TTT allocates A / B for every document slot of a batch (role adapter): a record's
    parameter count is the trained, exported model's, so they stay out of it."""
    plain = dry_build(stack_from_dict(tiny_stack(eval={"seq_len": 64})))
    lora = tiny_stack(eval={"seq_len": 64}, techniques={"lora_ttt": {"rank": 4, "docs_per_batch": 4}})
    assert dry_build(stack_from_dict(lora)).params == plain.params > 0
