"""The rollout as a value: scoring repeats each prompt's columns per sample, select/concat keep
every sample with its own prompt and count what was drawn, tensors carry the sampler's log-probs."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.rollout.engine import RolloutBatch, Sample
from alignkit.rollout.rollout import Rollout, score

from conftest import write_jsonl


def batch(n_prompts: int, G: int, tag: str) -> RolloutBatch:
    samples = [Sample(p, [1, 2 + p], [10 + p, 20 + k], [-0.5, -0.25], f"{tag}{p}.{k}", "length" if k else "eos")
               for p in range(n_prompts) for k in range(G)]
    return RolloutBatch(samples, G)


def test_score_select_concat_keep_prompts_with_their_samples():
    seen = []

    def reward(prompts, completions, **cols):
        seen.append((prompts, completions, cols))
        return [None if c.endswith(".1") and p == "a0" else float(len(c)) for p, c in zip(prompts, completions)]

    r1 = score(batch(2, 2, "a"), ["a0", "a1"], {"k": [0, 1]}, reward)
    assert seen[0][0] == ["a0", "a0", "a1", "a1"] and seen[0][2] == {"k": [0, 0, 1, 1]}
    assert r1.stats == {"generated_tokens": 8, "reward_missing": 1} and math.isnan(r1.rewards[1])  # not scored: NaN
    r2 = score(batch(1, 2, "b"), ["b0"], {"k": [7]}, reward)
    merged = Rollout.concat([r1.select_groups([1]), r2, r1.select_groups([0])])
    assert [merged.prompt_of(i) for i in range(len(merged))] == ["a1", "a1", "b0", "b0", "a0", "a0"]
    assert [s.text[:2] for s in merged.samples] == ["a1", "a1", "b0", "b0", "a0", "a0"]
    assert merged.columns == {"k": [1, 7, 0]}
    assert merged.rewards[:5].tolist() == [4.0] * 5 and math.isnan(merged.rewards[5])
    assert merged.truncated.tolist() == [False, True] * 3
    t = merged.tensors(0)
    assert "sampler_logps" in t and "old_logps" not in t
    assert t["sampler_logps"][t["completion_mask"]].tolist() == [-0.5, -0.25] * 6
    with pytest.raises(ValueError):
        score(batch(1, 2, "c"), ["c0"], {}, lambda p, c, **k: [1.0])


def test_rs_generate_pairs_each_answer_with_its_prompt(tiny_model_dir, tmp_path):
    from alignkit.config import RSConfig
    from alignkit.recipes.rs import generate_best_of_n

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + {i}?", "k": i} for i in range(5)])
    out = generate_best_of_n(RSConfig(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "b.jsonl"),
                                      num_generations=3, max_new_tokens=4, generation_batch_size=2),
                             reward_fn=lambda ps, cs, **k: [float(len(c)) for c in cs])
    rows = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5
    for r in rows:
        assert r["messages"][0]["content"] == f"{r['k']} + {r['k']}?" and r["messages"][-1]["role"] == "assistant"
        assert r["reward"] == float(len(r["messages"][-1]["content"]))
