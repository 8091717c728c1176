"""Exact resume for every online recipe: a run stopped after a checkpoint (the process dies inside
a later optimizer step, as under SIGKILL: no final save) and resumed with resume=true ends with
the weights of the uninterrupted run, bit for bit on CPU; the metrics log has each optimizer
step once. SFT (SIGKILL in a subprocess) and DPO are covered in test_trainer.py / test_dpo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit import config as C
from alignkit.training.trainer import Trainer

from conftest import digits, write_jsonl


class Killed(BaseException):
    """Raised inside an optimizer step to stand for the process dying there."""



pytestmark = pytest.mark.usefixtures("no_curve_plots")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume_prompts")
    return write_jsonl(d / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?", "k": i} for i in range(32)])


def recipe(name: str):
    from alignkit.recipes.grpo import train_grpo
    from alignkit.recipes.online_dpo import train_online_dpo
    from alignkit.recipes.ppo import train_ppo
    from alignkit.recipes.reinforce import train_reinforce
    from alignkit.recipes.rloo import train_rloo
    from alignkit.recipes.rs import train_rs

    return {
        "grpo": (train_grpo, C.GRPOConfig, dict(max_steps=4, batch_size=2, num_generations=2, iterations=2,
                                                 kl_coef=0.05, save_every=1), 5),
        "rloo": (train_rloo, C.RLOOConfig, dict(max_steps=4, batch_size=2, num_generations=2, kl_coef=0.05,
                                                 save_every=2), 3),
        "reinforce": (train_reinforce, C.ReinforceConfig, dict(max_steps=4, batch_size=4, kl_coef=0.05,
                                                               save_every=2), 3),
        # stopped inside round 2, whose best-of-N file is already on disk, with samples written every round
        "rs": (train_rs, C.RSConfig, dict(rounds=2, sft_steps=3, prompts_per_round=4, batch_size=2,
                                           num_generations=2, kl_coef=0.1, save_every=1, sample_every=1), 4),
        "ppo": (train_ppo, C.PPOConfig, dict(max_steps=3, batch_size=2, num_generations=2, ppo_epochs=2,
                                             critic_lr=3e-3, kl_coef=0.05, kl_control="adaptive", kl_target=0.01,
                                             kl_horizon=50, reward_norm="running", save_every=1), 3),
        "online-dpo": (train_online_dpo, C.OnlineDPOConfig, dict(max_steps=4, batch_size=2, num_generations=2,
                                                                 save_every=2), 3),
    }[name]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(run.rglob("*.safetensors")):
        if "checkpoints" not in f.parts:
            out.update({f"{f.relative_to(run)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def train_records(run: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def check_resume_equals_uninterrupted(name, model_dir, prompt_file, tmp_path, monkeypatch):
    train, Config, kw, kill_at = recipe(name)

    def cfg(out, **extra):
        return Config(model=str(model_dir), data=str(prompt_file), output_dir=str(out), max_new_tokens=6, lr=3e-3,
                      progress=False, tensorboard=False, log_every=1, seed=1, **kw, **extra)

    full = tmp_path / "full"
    train(cfg(full), reward_fn=digits)

    def dying(real):
        def step(self, metrics):
            if self.step == kill_at and self.recipe == name:
                raise Killed(f"stopped inside optimizer step {kill_at + 1}")
            return real(self, metrics)

        return step

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", dying(Trainer.optimizer_step))
        m.setattr(Trainer, "skip_update", dying(Trainer.skip_update))
        with pytest.raises(Killed):
            train(cfg(stopped), reward_fn=digits)
    assert not (stopped / "model.safetensors").exists() and list((stopped / "checkpoints").iterdir())
    train(cfg(stopped, resume=True), reward_fn=digits)

    a, b = weights(full), weights(stopped)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = train_records(full), train_records(stopped)
    opt = [r.get("optimizer_step", r["step"]) for r in rb]
    assert opt == list(range(1, len(ra) + 1))  # every optimizer step once, none twice
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r.get("reward_mean") for r in ra] == [r.get("reward_mean") for r in rb]
    assert ra[-1]["generated_tokens"] == rb[-1]["generated_tokens"]  # the loop's counter is restored
    return full, stopped


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce", "rs", "ppo", "online-dpo"])
def test_resume_equals_uninterrupted(name, tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    full, _ = check_resume_equals_uninterrupted(name, tiny_model_dir, prompt_file, tmp_path, monkeypatch)
    if name == "ppo":
        assert any(str(k).startswith("critic") for k in weights(full))  # the critic was compared too


def test_online_records_are_filed_by_rollout_step(tiny_model_dir, prompt_file, tmp_path):
    """max_steps counts rollout steps; each optimizer step's record carries both counters and
    evaluations are filed under the rollout step (issue 15)."""
    from alignkit.recipes.grpo import train_grpo

    out = tmp_path / "g"
    train_grpo(C.GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), eval_data=str(prompt_file),
                            output_dir=str(out), max_steps=3, iterations=2, batch_size=2, num_generations=2,
                            max_new_tokens=4, eval_every=2, eval_prompts=2, progress=False, tensorboard=False,
                            log_every=1), reward_fn=digits)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 1, 2, 2, 3, 3]
    assert [r["optimizer_step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["generated_tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 3]
