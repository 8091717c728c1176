"""Recipe regression: a tiny fixed-seed CPU run of each of the nine recipes logs the same losses
and gradient norms as the numbers stored in tests/recipes/trajectories/<recipe>.json (relative tolerance
1e-5), in the style of torchtune's recipe tests. A refactor of the loop machinery must leave
them unchanged; a change made on purpose (a fixed fault) re-records the file and names the fault
in the commit.

Regenerate: ALIGNKIT_RECORD_TRAJECTORIES=1 python -m pytest tests/recipes/test_trajectories.py
(the numbers are those of this machine's CPU kernels, float32, one thread)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from conftest import chat_rows, digits, write_jsonl

STORE = Path(__file__).parent / "trajectories"
RECORD = os.environ.get("ALIGNKIT_RECORD_TRAJECTORIES") == "1"
REL = 1e-5
# keys compared per logged step, where the recipe logs them
KEYS = ("loss", "grad_norm", "value_loss", "value_grad_norm", "reward_mean", "kl")



pytestmark = pytest.mark.usefixtures("no_curve_plots")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("traj_prompts")
    return write_jsonl(d / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?", "k": i} for i in range(32)])


def _common(model_dir, out) -> dict:
    return dict(model=str(model_dir), output_dir=str(out), progress=False, tensorboard=False, plot=False,
                log_every=1, seed=0, logits_chunk_size=16)


def run_recipe(name: str, model_dir: Path, tmp: Path, prompt_file: Path) -> list[dict]:
    from alignkit import config as C

    out = tmp / name
    common = _common(model_dir, out)
    online = dict(data=str(prompt_file), max_new_tokens=8, lr=3e-3, sample_every=0, **common)
    if name == "sft":
        from alignkit.recipes.sft import train_sft

        data = write_jsonl(tmp / "sft.jsonl", chat_rows(16))
        train_sft(C.SFTConfig(data=str(data), batch_size=2, grad_accum=2, max_steps=6, lr=1e-3, **common))
    elif name in ("rm", "dpo"):
        from alignkit.toy import world

        data = write_jsonl(tmp / "pairs.jsonl", world.preference_rows(24, seed=0, split="train"))
        if name == "rm":
            from alignkit.recipes.rm import train_rm

            train_rm(C.RMConfig(data=str(data), batch_size=4, max_steps=5, lr=1e-3, max_length=128, **common))
        else:
            from alignkit.recipes.dpo import train_dpo

            train_dpo(C.DPOConfig(data=str(data), batch_size=2, grad_accum=2, max_steps=5, lr=5e-3, beta=0.5,
                                  **common))
    elif name == "reinforce":
        from alignkit.recipes.reinforce import train_reinforce

        train_reinforce(C.ReinforceConfig(max_steps=5, batch_size=4, kl_coef=0.05, **online), reward_fn=digits)
    elif name == "rloo":
        from alignkit.recipes.rloo import train_rloo

        train_rloo(C.RLOOConfig(max_steps=5, batch_size=2, num_generations=4, kl_coef=0.05, **online),
                   reward_fn=digits)
    elif name == "grpo":
        from alignkit.recipes.grpo import train_grpo

        train_grpo(C.GRPOConfig(max_steps=3, batch_size=2, grad_accum=2, num_generations=4, iterations=2,
                                kl_coef=0.05, **online), reward_fn=digits)
    elif name == "rs":
        from alignkit.recipes.rs import train_rs

        train_rs(C.RSConfig(rounds=2, sft_steps=3, prompts_per_round=8, batch_size=4, num_generations=4,
                            kl_coef=0.1, **online), reward_fn=digits)
    elif name == "ppo":
        from alignkit.recipes.ppo import train_ppo

        train_ppo(C.PPOConfig(max_steps=2, batch_size=2, num_generations=2, ppo_epochs=2, num_minibatches=2,
                              critic_lr=3e-3, kl_coef=0.05, **online), reward_fn=digits)
    elif name == "online-dpo":
        from alignkit.recipes.online_dpo import train_online_dpo

        train_online_dpo(C.OnlineDPOConfig(max_steps=5, batch_size=4, num_generations=4, beta=0.1, **online),
                         reward_fn=digits)
    else:
        raise AssertionError(name)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS if k in r} for r in recs if r["kind"] == "train"]


RECIPES = ["sft", "rm", "dpo", "reinforce", "rloo", "grpo", "rs", "ppo", "online-dpo"]


@pytest.mark.parametrize("name", RECIPES)
def test_trajectory_unchanged(name, tiny_model_dir, tmp_path, prompt_file):
    got = run_recipe(name, tiny_model_dir, tmp_path, prompt_file)[:10]
    path = STORE / f"{name}.json"
    if RECORD:
        STORE.mkdir(exist_ok=True)
        path.write_text(json.dumps({"recipe": name, "steps": got}, indent=1) + "\n", encoding="utf-8")
        pytest.skip(f"recorded {path}")
    want = json.loads(path.read_text(encoding="utf-8"))["steps"]
    assert len(got) == len(want) >= 5
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), (i, sorted(g), sorted(w))
        for k in w:
            assert math.isclose(g[k], w[k], rel_tol=REL, abs_tol=1e-9), f"{name} step {i + 1} {k}: {g[k]} != {w[k]}"
