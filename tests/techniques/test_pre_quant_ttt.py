"""pre_quant_ttt (illegal): it really reads the validation shard during finalize, and the data
probe's file watch sees it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from runs import VOCAB, tiny_stack, tiny_trainer, token_shard

from pgolf.registry.run import data
from pgolf.registry.run.legality import data_probe


def test_it_fine_tunes_on_the_validation_shard_next_to_the_training_shards(tmp_path: Path) -> None:
    shard = token_shard(tmp_path)
    val = tmp_path / "fineweb_val_000000.bin"
    data.write_shard(val, np.random.default_rng(1).integers(0, VOCAB, 200))
    rs = tiny_stack({"pre_quant_ttt": {"epochs": 1, "lr": 0.01}})
    b, trainer = tiny_trainer(rs, shard)
    tech = next(t for t in b.techniques if t.name == "pre_quant_ttt")
    tech.train_loader(files=[shard], rank=0, world_size=1)  # the slot call the pipeline makes
    trainer.run()
    before = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    with data.watch_opens([val], where=lambda: f"step {trainer.state.step}") as watch:
        watch.phase = "finalize"
        trainer.finalize()
    changed = [n for n, p in b.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the fine-tuning on validation tokens changed no weight"
    res = data_probe(watch)
    assert res.passed is False
    assert (
        "validation shard fineweb_val_000000.bin was opened during training (at finalize, step 4)"
        in res.message
    )
