"""docs/architecture.md's "adding a recipe" example is real code: its loss matches a naive
computation from full logits, and it trains through the shared loop."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch

from alignkit.data.preference import load_pairs, pair_collate
from alignkit.models import load_model, load_tokenizer
from alignkit.toy import world

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def example_module() -> types.ModuleType:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- recipe example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md lost its recipe example block"
    mod = types.ModuleType("unlikelihood_example")
    exec(compile(m.group(1), str(DOC), "exec"), mod.__dict__)
    return mod


def test_example_loss_matches_full_logits(tiny_model_dir, tmp_path):
    ex = example_module()
    data = world.write_jsonl(world.preference_rows(4, seed=0), tmp_path / "pairs.jsonl")
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(data), "train", tok, 256)
    mb = pair_collate(pairs, tok.pad_token_id)
    model = load_model(str(tiny_model_dir)).double()
    cfg = ex.UnlikelihoodConfig(model=str(tiny_model_dir), data=str(data), alpha=0.5)
    with torch.no_grad():
        loss_sum, metrics = ex.unlikelihood_loss_fn(cfg)(model, mb)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    p = torch.softmax(logits, -1)
    want = 0.0
    n = len(pairs)
    for b in range(2 * n):
        for t in range(mb["targets"].shape[1]):
            y = int(mb["targets"][b, t])
            if y == -100:
                continue
            want += -torch.log(p[b, t, y]) if b < n else -0.5 * torch.log1p(-p[b, t, y])
    assert float(loss_sum) == pytest.approx(float(want), rel=1e-6)
    assert float(metrics["nll"]) + 0.5 * float(metrics["unlikelihood"]) == pytest.approx(float(want), rel=1e-6)


def test_example_trains_through_the_shared_loop(tiny_model_dir, tmp_path):
    ex = example_module()
    data = world.write_jsonl(world.preference_rows(16, seed=0), tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    ex.train_unlikelihood(ex.UnlikelihoodConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out),
                                                max_steps=2, batch_size=4, progress=False, tensorboard=False,
                                                plot=False, log_every=1))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["unlikelihood"] > 0 and r["nll"] > 0 for r in train)
    assert (out / "model.safetensors").is_file()
