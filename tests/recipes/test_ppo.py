"""PPO: GAE against hand recursions on the real rollout layout, reward placement, value-loss
clipping, the adaptive KL controller, critics (separate / from a reward model / shared base),
global normalisation of the critic's loss, a seeded run that raises the reward, exact resume
with the critic, CLI end to end and bad input."""

from __future__ import annotations

import pytest
import torch

from alignkit.advantages import gae, whiten
from alignkit.cli import main
from alignkit.config import PPOConfig
from alignkit.errors import UserError
from alignkit.losses import value_loss_terms
from alignkit.models import load_model, load_tokenizer
from alignkit.models.value import load_value_model
from alignkit.recipes import online as ol
from alignkit.recipes.ppo import (KLController, RunningMoments, _reward_model_path, build_critic, explained_variance,
                                  global_whiten, ppo_value_loss_fn, take_rows, token_rewards, train_ppo)
from alignkit.rollout.engine import RolloutBatch, Sample
from alignkit.training.dist import DistInfo

from conftest import DIGITS_SRC, digits, metrics, write_jsonl

pytestmark = pytest.mark.usefixtures("no_curve_plots")


def ragged_batch() -> tuple[RolloutBatch, list[tuple[int, int]]]:
    """Three samples with different prompt and completion lengths (the last one cut without eos)."""
    shapes = [(3, 4), (5, 1), (2, 6)]
    samples = []
    for i, (p, c) in enumerate(shapes):
        comp = [10 + i * 10 + k for k in range(c)]
        samples.append(Sample(i, list(range(1, p + 1)), comp, [-0.1 * (k + 1) for k in range(c)], "", "eos"))
    return RolloutBatch(samples, 1), shapes


# --------------------------------------------------------------------------- GAE and rewards


def test_gae_by_hand():
    # r = [0, 0, 1], V = [0.5, 0.2, 0.1], γ = 0.9, λ = 0.8; the step after the last token is terminal
    # δ2 = 1 - 0.1 = 0.9;            A2 = 0.9
    # δ1 = 0.9·0.1 - 0.2 = -0.11;    A1 = -0.11 + 0.72·0.9  = 0.538
    # δ0 = 0.9·0.2 - 0.5 = -0.32;    A0 = -0.32 + 0.72·0.538 = 0.06736
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[9.0, 0.5, 0.2, 0.1, 7.0]], dtype=torch.float64)  # 9 and 7 sit outside the response
    m = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.06736, 0.538, 0.9, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.56736, 0.738, 1.0, 0.0]], dtype=torch.float64))


def test_rewards_and_gae_on_the_rollout_layout():
    """Score on the response's last real token, KL on every response token, nothing on prompt or
    padding; GAE over exactly the response tokens equals a per-sample Python recursion."""
    batch, shapes = ragged_batch()
    t = batch.tensors(pad_id=0)
    mask = t["completion_mask"]
    B, T = mask.shape
    g = torch.Generator().manual_seed(0)
    kl = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    scores = torch.tensor([1.5, -2.0, 0.25])
    beta, gamma, lam = 0.3, 0.9, 0.7
    r = token_rewards(scores, kl, mask, beta)
    adv, ret = gae(r, values, mask, gamma, lam)
    for b, (p, c) in enumerate(shapes):
        pos = list(range(p - 1, p + c - 1))  # the positions predicting the c response tokens
        assert mask[b].nonzero().squeeze(-1).tolist() == pos
        assert t["targets"][b, pos[-1]] == batch.samples[b].completion_ids[-1]  # the last real token
        want_r = [-beta * float(kl[b, q]) for q in pos]
        want_r[-1] += float(scores[b])
        torch.testing.assert_close(r[b, pos], torch.tensor(want_r), rtol=0, atol=1e-6)
        assert float(r[b][~mask[b]].abs().sum()) == 0.0
        vs = [float(values[b, q]) for q in pos]
        a, nxt_v, nxt_a, want_a = 0.0, 0.0, 0.0, [0.0] * c
        for k in reversed(range(c)):
            delta = want_r[k] + gamma * nxt_v - vs[k]
            a = delta + gamma * lam * nxt_a
            want_a[k], nxt_v, nxt_a = a, vs[k], a
        torch.testing.assert_close(adv[b, pos], torch.tensor(want_a), rtol=0, atol=1e-5)
        torch.testing.assert_close(ret[b, pos], torch.tensor(want_a) + torch.tensor(vs), rtol=0, atol=1e-5)
        assert float(adv[b][~mask[b]].abs().sum()) == 0.0


def test_whitening_and_explained_variance_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 100.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]]).bool()
    dist = DistInfo()
    torch.testing.assert_close(global_whiten(x, m, dist), whiten(x, m))
    torch.testing.assert_close(global_whiten(x, m, dist, shift_mean=False), whiten(x, m, shift_mean=False))
    # values 1, 2, 3, 6 vs returns 2, 2, 4, 6: errors 1, 0, 1, 0 (var 0.25); returns var 2.75
    v = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 6.0]])
    ret = torch.tensor([[2.0, 2.0, 0.0], [4.0, 0.0, 6.0]])
    assert explained_variance(v, ret, m, dist) == pytest.approx(1 - 0.25 / 2.75)


def test_running_moments_match_all_scores_seen():
    rm, seen = RunningMoments(), []
    for batch in ([1.0, 2.0, 4.0], [10.0], [-3.0, 0.5]):
        x = torch.tensor(batch, dtype=torch.float64)
        rm.update(len(batch), float(x.sum()), float((x * x).sum()))
        seen += batch
        assert rm.mean == pytest.approx(torch.tensor(seen).double().mean().item())
        if len(seen) > 1:
            assert rm.std == pytest.approx(torch.tensor(seen).double().std().item())


# --------------------------------------------------------------------------- value loss, KL controller


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.3]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 0.3]])
    ret = torch.tensor([[2.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    t = value_loss_terms(values, old, ret, mask, clip_range=0.2)
    # token 0: (1 - 2)^2 = 1 vs clipped V = 0.7: (0.7 - 2)^2 = 1.69 -> the clipped one, gradient 0
    # token 1: (0 - 1)^2 = 1 both ways -> unclipped; token 2 masked
    assert float(t.loss_sum.detach()) == pytest.approx(0.5 * 1.69 + 0.5 * 1.0)
    assert float(t.count) == 2 and float(t.stats["clipped"]) == 1
    t.loss_sum.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.0, 0.0]]))
    plain = value_loss_terms(values.detach(), old, ret, mask, clip_range=None)
    assert float(plain.loss_sum) == pytest.approx(0.5 * 1.0 + 0.5 * 1.0)


def test_adaptive_kl_controller_update():
    c = KLController(0.1, adaptive=True, target=6.0, horizon=10000)
    c.update(9.0, 256)  # error 9/6 - 1 = 0.5, clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    before = c.value
    c.update(5.4, 100)  # error -0.1
    assert c.value == pytest.approx(before * (1 - 0.1 * 100 / 10000))
    c.update(0.0, 1000)  # error -1 clipped to -0.2
    assert c.value == pytest.approx(before * (1 - 0.1 * 100 / 10000) * (1 - 0.2 * 1000 / 10000))
    d = KLController(0.5, adaptive=False)
    d.update(100.0, 1000)
    assert d.value == 0.5
    e = KLController(1.0, adaptive=True)
    e.load_state_dict(c.state_dict())
    assert e.value == c.value and e.updates == 3
    with pytest.raises(UserError):
        KLController(0.0, adaptive=True)


# --------------------------------------------------------------------------- critics


def test_critic_from_policy_starts_at_zero_and_from_reward_model_reads_its_score(tiny_model_dir, tmp_path):
    from alignkit.models.reward import RewardModel, RewardSpec, load_reward_backbone

    tok = load_tokenizer(str(tiny_model_dir))
    batch, _ = ragged_batch()
    t = batch.tensors(pad_id=0)
    crit = load_value_model("policy", str(tiny_model_dir), tok)
    with torch.no_grad():
        v = crit(t["input_ids"], t["attention_mask"], t["position_ids"])
    assert v.shape == t["input_ids"].shape and float(v.abs().max()) == 0.0
    # a scalar reward model: the critic is its backbone and head, so V at the last real token = its score
    rm_model, _ = load_reward_backbone(str(tiny_model_dir), RewardSpec())
    torch.manual_seed(0)
    torch.nn.init.normal_(rm_model.score.weight, std=0.5)
    rm_dir = tmp_path / "rm"
    RewardModel(rm_model, tok).save_pretrained(rm_dir)
    assert _reward_model_path(PPOConfig(model="x", reward=str(rm_dir)).reward) == str(rm_dir)  # critic_init=auto
    assert _reward_model_path(PPOConfig(model="x", reward="toy").reward) is None
    rm = RewardModel.from_pretrained(rm_dir)
    crit = load_value_model("reward", str(rm_dir), tok)
    with torch.no_grad():
        v = crit(t["input_ids"], t["attention_mask"], t["position_ids"])
        want = rm.rewards(t["input_ids"], t["attention_mask"], t["position_ids"])
    last = t["attention_mask"].sum(-1) - 1
    torch.testing.assert_close(v[torch.arange(3), last], want, rtol=1e-5, atol=1e-5)
    # end to end: reward=RM folder scores the answers and (critic_init=auto) initialises the critic, whose
    # first values are then the RM's scores of the prefixes, not the zeros of a policy-initialised critic
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + {i}"} for i in range(8)])
    for reward, nonzero in ((str(rm_dir), True), ("toy", False)):
        out = tmp_path / f"run-{nonzero}"
        train_ppo(PPOConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(out), reward=reward,
                            max_steps=1, batch_size=4, max_new_tokens=4, ppo_epochs=1, progress=False, log_every=1,
                            save_critic=False), reward_fn=None if nonzero else digits)
        assert (abs(metrics(out)[0]["values_mean"]) > 1e-4) == nonzero


def test_critic_loss_is_normalised_over_the_global_batch(tiny_model_dir, tmp_path):
    """Critic gradients through its own Trainer: one micro-batch of 8 equals 4 micro-batches of 2."""
    from alignkit.training.trainer import Trainer

    tok = load_tokenizer(str(tiny_model_dir))
    samples = [Sample(i, list(range(1, 2 + i % 3)), [5 + k for k in range(1 + (i * 5) % 7)], [0.0] * (1 + (i * 5) % 7),
                      "", "eos") for i in range(8)]
    full = RolloutBatch(samples, 1).tensors(0)
    g = torch.Generator().manual_seed(1)
    full["returns"] = torch.randn(full["input_ids"].shape, generator=g)
    full["old_values"] = 0.1 * torch.randn(full["input_ids"].shape, generator=g)
    cfg = PPOConfig(model="x", value_clip=0.05, output_dir=str(tmp_path / "c"), progress=False, tensorboard=False)

    def grads(n_mb):
        torch.manual_seed(0)
        crit = load_value_model("policy", str(tiny_model_dir), tok)
        torch.nn.init.normal_(crit.head.linear.weight, std=0.3)
        tr = Trainer(cfg, crit, recipe="ppo-critic", total_steps=1, dist_info=DistInfo(), log=lambda s: None,
                     log_metrics=False)
        rows = list(range(8))
        per = 8 // n_mb
        mbs = [take_rows(full, rows[i:i + per]) for i in range(0, 8, per)]
        out = tr.accumulate(mbs, ppo_value_loss_fn(cfg), lambda mb: float(mb["completion_mask"].sum()))
        return {n: p.grad.clone() for n, p in crit.named_parameters() if p.grad is not None}, out

    g1, o1 = grads(1)
    g4, o4 = grads(4)
    assert o1["loss"] == pytest.approx(o4["loss"], rel=1e-6)
    assert o1["value_clip_frac"] == pytest.approx(o4["value_clip_frac"]) and 0 < o1["value_clip_frac"] < 1
    assert g1.keys() == g4.keys() and len(g1) > 5
    for k in g1:
        torch.testing.assert_close(g1[k], g4[k], atol=1e-7, rtol=1e-4)


def test_shared_base_critic_holds_one_copy_of_the_base(tiny_model_dir, prompt_file, tmp_path):
    cfg = PPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(tmp_path / "s"),
                    critic="shared_base", peft={"method": "lora", "r": 4}, kl_coef=0.1, progress=False,
                    batch_size=2, max_steps=1)
    run = ol.OnlineRun(cfg, "ppo", reward_fn=digits)
    critic = build_critic(cfg, run)
    policy = run.trainer.model
    assert run.ref is policy  # the reference is the adapter switched off
    assert [n for n, _ in critic.named_parameters()] == ["head.linear.weight", "head.linear.bias"]
    names = [n for n, _ in critic.adapter_parameters()]
    assert names and all(".critic." in n and "lora_" in n for n in names)
    base_ids = {id(p) for n, p in policy.named_parameters() if "lora_" not in n}
    assert not base_ids & {id(p) for p in critic.trainable_parameters()}
    # the critic's forward uses its own adapter: with nonzero critic LoRA weights, values change,
    # while the policy's log-probs (adapter "default") do not
    batch, _ = ragged_batch()
    t = batch.tensors(0)
    torch.nn.init.normal_(critic.head.linear.weight, std=0.5)
    lp0 = ol.token_logps(policy, t, 1.0, 64).detach()
    v0 = critic(t["input_ids"], t["attention_mask"], t["position_ids"]).detach()
    with torch.no_grad():
        for _, p in critic.adapter_parameters():
            p.add_(0.3)
    v1 = critic(t["input_ids"], t["attention_mask"], t["position_ids"]).detach()
    lp1 = ol.token_logps(policy, t, 1.0, 64).detach()
    assert float((v1 - v0).abs().max()) > 1e-3
    torch.testing.assert_close(lp0, lp1)
    assert policy.active_adapter == "default"


# --------------------------------------------------------------------------- runs


def test_ppo_raises_reward_and_logs_everything(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "ppo"
    train_ppo(PPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=12,
                        batch_size=8, num_generations=2, max_new_tokens=12, lr=1e-2, critic_lr=1e-2, kl_coef=0.01,
                        ppo_epochs=2, num_minibatches=2, progress=False, log_every=1, seed=0), reward_fn=digits)
    tr = metrics(out)
    assert len(tr) == 12 * 2 * 2
    per_rollout = tr[::4]
    first = sum(r["reward_mean"] for r in per_rollout[:4]) / 4
    last = sum(r["reward_mean"] for r in per_rollout[-4:]) / 4
    assert last > first + 0.08, (first, last)
    for key in ("policy_loss", "value_loss", "explained_variance", "kl", "kl_seq", "kl_coef", "clip_frac",
                "value_clip_frac", "entropy", "reward_mean", "response_len", "time_generate_s", "time_score_s",
                "time_prepare_s", "time_train_s", "logprob_mismatch", "critic_lr", "value_grad_norm", "approx_kl"):
        assert all(key in r for r in tr[3::4]), key
    assert max(r["logprob_mismatch"] for r in tr) < 1e-4
    assert (out / "critic" / "value_head.safetensors").is_file() and (out / "critic" / "config.json").is_file()
    assert (out / "model.safetensors").is_file()


def test_ppo_resume_restores_critic_and_kl_controller(tiny_model_dir, prompt_file, tmp_path):
    """LoRA policy + shared-base critic + adaptive β: stopping after 2 of 4 rollout steps and
    resuming gives the same weights, critic and β as the uninterrupted run."""
    from safetensors.torch import load_file

    def cfg(out, **kw):
        return PPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=4,
                         batch_size=4, num_generations=2, max_new_tokens=8, lr=3e-3, critic_lr=3e-3, kl_coef=0.5,
                         kl_control="adaptive", kl_target=0.01, kl_horizon=50, ppo_epochs=2, critic="shared_base",
                         peft={"method": "lora", "r": 4}, progress=False, log_every=1, seed=3, **kw)

    a = tmp_path / "a"
    train_ppo(cfg(a, save_every=2), reward_fn=digits)
    mid = a / "checkpoints" / "step-0000004"  # after rollout step 2 of 4 (2 optimizer steps each)
    assert (mid / "trainer_state.json").is_file()
    assert not (mid / "critic").exists()  # checkpoints hold the policy adapter; the critic is in the trainer state
    b = tmp_path / "b"
    train_ppo(cfg(b, resume=str(mid)), reward_fn=digits)
    for f in ("adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/value_head.safetensors"):
        wa, wb = load_file(str(a / f)), load_file(str(b / f))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    ma, mb = metrics(a), metrics(b)
    assert ma[-1]["kl_coef"] == mb[-1]["kl_coef"] and ma[-1]["kl_coef"] != 0.5  # β moved and was restored
    assert ma[-1]["value_loss"] == mb[-1]["value_loss"]


# --------------------------------------------------------------------------- CLI


def test_cli_ppo_end_to_end(tiny_model_dir, prompt_file, tmp_path, capsys):
    rfile = tmp_path / "myreward.py"
    rfile.write_text(DIGITS_SRC)
    out = tmp_path / "cli"
    code = main(["ppo", f"model={tiny_model_dir}", f"data={prompt_file}", f"reward={rfile}:digits",
                 f"output_dir={out}", "max_steps=2", "batch_size=4", "max_new_tokens=6", "ppo_epochs=1",
                 "num_minibatches=2", "progress=false", "log_every=1"])
    assert code == 0
    assert "done: model saved to" in capsys.readouterr().out
    assert len(metrics(out)) == 4 and (out / "critic" / "value_head.safetensors").is_file()
    assert load_model(str(out)) is not None


@pytest.mark.parametrize("extra, needle", [
    (["critic=shared_base"], "needs peft.method=lora"),
    (["kl_control=adaptive", "kl_coef=0"], "needs kl_coef > 0"),
    (["critic_init=reward"], "critic_init=reward needs"),
    (["critic_init=/no/such/folder"], "not policy, reward, auto or an existing model folder"),
    (["ppo_epoch=2"], "did you mean 'ppo_epochs'"),
    (["critic=both"], "bad value for 'critic'"),
])
def test_cli_ppo_bad_input_exit_2(tiny_model_dir, prompt_file, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code = main(["ppo", f"model={tiny_model_dir}", f"data={prompt_file}", f"output_dir={out}", "progress=false",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_critic_divergence_stops_with_a_checkpoint(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """The critic trains through a Trainer: a non-finite value loss stops the run before the update
    (exit code 3) after saving the run's checkpoint, critic state included."""
    import alignkit.recipes.ppo as ppo_mod
    from alignkit.training.trainer import TrainingDiverged

    real = ppo_mod.value_loss_terms

    def nan_terms(*a, **k):
        t = real(*a, **k)
        return t._replace(loss_sum=t.loss_sum * float("nan"))

    monkeypatch.setattr(ppo_mod, "value_loss_terms", nan_terms)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        train_ppo(PPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=2,
                            batch_size=2, num_generations=2, max_new_tokens=4, progress=False, seed=0),
                  reward_fn=digits)
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1
    from alignkit.training import checkpoint as ckpt

    state = ckpt.load_state(ckpts[0] / "trainer_state.json")
    assert state["step"] == 0 and "weights" in state["extra"]["critic"]
