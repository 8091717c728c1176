"""toy.pairs.onpolicy_pairs (moved from recipes/dpo.py, used by the demo): every completion that
the toy rule does not score as fully right becomes a rejected answer against the reference."""

from __future__ import annotations

from alignkit.toy import world
from alignkit.toy.pairs import onpolicy_pairs


def test_onpolicy_pairs_reject_the_models_wrong_answers(tiny_model_dir, monkeypatch):
    prompts = world.prompt_rows(3, seed=0)
    # A random tiny model answers nothing right: every sample is a pair.
    rows = onpolicy_pairs(str(tiny_model_dir), prompts, samples=2, temperature=1.0, seed=0, max_new_tokens=4)
    assert len(rows) == 2 * len(prompts)
    for i, r in enumerate(rows):
        p = prompts[i % len(prompts)]
        assert r["prompt"] == p["prompt"] and r["total"] == p["total"]
        assert r["chosen"] == [{"role": "assistant", "content": p["answer"]}]
        assert world.score(r["rejected"][0]["content"], p["total"])["reward"] < world.CORRECT_REWARD
    # A completion the rule scores as right yields no pair.
    monkeypatch.setattr("alignkit.toy.pairs.generate_texts",
                        lambda model, tok, ps, **kw: [q["answer"] for q in prompts])
    assert onpolicy_pairs(str(tiny_model_dir), prompts) == []
