"""Online DPO: pair construction (best vs worst, ties skipped and counted), the pair loss against
separately computed sequence log-probs, which reference is loaded, a seeded run that raises the
reward, CLI end to end and bad input."""

from __future__ import annotations

import pytest
import torch

from alignkit.cli import main
from alignkit.config import OnlineDPOConfig
from alignkit.losses import dpo_loss
from alignkit.models import load_model, load_tokenizer
from alignkit.ops.logprobs import causal_lm_token_logps
from alignkit.recipes import online as ol
from alignkit.recipes.online_dpo import build_pairs, online_dpo_loss_fn, pair_batches, train_online_dpo
from alignkit.rollout.engine import RolloutBatch, Sample

from conftest import DIGITS_SRC, digits, metrics

pytestmark = pytest.mark.usefixtures("no_curve_plots")


def test_pairs_are_best_vs_worst_and_ties_are_skipped():
    r = torch.tensor([0.1, 0.5, 0.5, 0.2,    # best: the first 0.5 (index 1), worst 0.1 (index 0)
                      1.0, 1.0, 1.0, 1.0,    # all equal: skipped
                      0.3, 0.0, 0.9, 0.0,    # best 0.9 (10), worst: the first 0.0 (9)
                      -1.0, 2.0, 2.0, 2.0])  # best: the first 2.0 (13), worst -1.0 (12)
    pairs, ties = build_pairs(r, 4)
    assert pairs == [(1, 0), (10, 9), (13, 12)] and ties == 1
    pairs, ties = build_pairs(torch.tensor([0.2, 0.7, 0.4, 0.4]), 2)  # G = 2: the better one is chosen
    assert pairs == [(1, 0)] and ties == 1
    # min_gap: a group whose best and worst differ by at most min_gap is skipped too
    r = torch.tensor([1.0, 0.1, 0.1, 0.0,    # right vs wrong total: kept, worst is the 0.0
                      0.1, 0.0, 0.1, 0.1])   # format-only difference (0.1): skipped with min_gap 0.5
    assert build_pairs(r, 4) == ([(0, 3), (4, 5)], 0)
    assert build_pairs(r, 4, min_gap=0.5) == ([(0, 3)], 1)
    with pytest.raises(ValueError):
        build_pairs(torch.ones(5), 2)


@pytest.mark.parametrize("loss, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("sigmoid", 0.7)])
def test_pair_loss_equals_dpo_loss_on_separately_computed_logps(tiny_model_dir, loss, sft_weight):
    """Chosen and rejected rows in one padded forward pass give the same loss as scoring every
    answer on its own; a zero-weight filler pair contributes nothing."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    ref = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    shapes = [(4, 3), (2, 6), (5, 1), (3, 4), (6, 2), (2, 2)]
    samples = [Sample(i // 2, list(range(5, 5 + p)), [20 + i + k for k in range(c)], [-1.0] * c, "", "eos")
               for i, (p, c) in enumerate(shapes)]
    batch = RolloutBatch(samples, 2)
    pairs, weights = [(0, 1), (3, 2), (4, 5)], [1.0, 1.0, 0.0]
    mbs = pair_batches(batch, pairs, weights, per_mb=8, pad_id=tok.pad_token_id)
    assert len(mbs) == 1
    mb = mbs[0]
    assert mb["input_ids"].shape[0] == 6
    with torch.no_grad():
        mb["ref_logps"] = causal_lm_token_logps(ref, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                                                mb["targets"])
    cfg = OnlineDPOConfig(model="x", loss=loss, beta=0.5, sft_weight=sft_weight)
    loss_sum, _ = online_dpo_loss_fn(cfg)(model, mb)

    def seq(m, s):  # one answer alone, unpadded
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        tgt = torch.full_like(ids, -100)
        tgt[0, len(s.prompt_ids) - 1:-1] = torch.tensor(s.completion_ids)
        with torch.no_grad():
            return causal_lm_token_logps(m, ids, targets=tgt).sum()

    c = torch.stack([seq(model, samples[i]) for i, _ in pairs[:2]])
    r = torch.stack([seq(model, samples[j]) for _, j in pairs[:2]])
    rc = torch.stack([seq(ref, samples[i]) for i, _ in pairs[:2]])
    rr = torch.stack([seq(ref, samples[j]) for _, j in pairs[:2]])
    lc = torch.tensor([float(len(samples[i].completion_ids)) for i, _ in pairs[:2]])
    lr = torch.tensor([float(len(samples[j].completion_ids)) for _, j in pairs[:2]])
    want, _, _ = dpo_loss(c, r, rc, rr, beta=0.5, loss_type=loss, gamma=0.5 if loss == "simpo" else 0.0,
                          chosen_lengths=lc, rejected_lengths=lr)
    want = want + sft_weight * (-c / lc)  # NLL of the chosen answer, token mean
    assert float(loss_sum.detach()) == pytest.approx(float(want.sum()), rel=1e-5)


def test_reference_is_a_frozen_copy_adapter_off_or_none(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    base = dict(model=str(tiny_model_dir), data=str(prompt_file), progress=False, batch_size=2, max_steps=1)
    run = ol.OnlineRun(OnlineDPOConfig(output_dir=str(tmp_path / "a"), **base), "t", reward_fn=digits,
                       need_reference=True)
    assert run.ref is not None and run.ref is not run.trainer.model
    assert not any(p.requires_grad for p in run.ref.parameters())
    run = ol.OnlineRun(OnlineDPOConfig(output_dir=str(tmp_path / "b"), peft={"method": "lora", "r": 4}, **base), "t",
                       reward_fn=digits, need_reference=True)
    assert run.ref is run.trainer.model  # LoRA: the adapter switched off
    calls = []
    real = ol.load_reference
    monkeypatch.setattr(ol, "load_reference", lambda *a: calls.append(1) or real(*a))
    train_online_dpo(OnlineDPOConfig(output_dir=str(tmp_path / "c"), loss="simpo", num_generations=2,
                                     max_new_tokens=4, **base), reward_fn=digits)
    assert calls == []
    assert "kl" not in metrics(tmp_path / "c")[0]


def test_online_dpo_raises_reward(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "odpo"
    train_online_dpo(OnlineDPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out),
                                     max_steps=20, batch_size=8, num_generations=4, max_new_tokens=12, lr=1e-2,
                                     beta=0.1, progress=False, log_every=1, seed=0), reward_fn=digits)
    tr = metrics(out)
    first = sum(r["reward_mean"] for r in tr[:5]) / 5
    last = sum(r["reward_mean"] for r in tr[-5:]) / 5
    assert last > first + 0.04, (first, last)
    for key in ("loss", "pairs", "tied_groups", "reward_margin", "reward_accuracy", "kl", "logprob_mismatch",
                "reward_mean", "response_len", "time_generate_s", "time_score_s", "time_train_s"):
        assert all(key in r for r in tr), key
    assert all(r["pairs"] + r["tied_groups"] == 8 for r in tr)
    assert max(r["logprob_mismatch"] for r in tr) < 1e-4


def test_cli_online_dpo_end_to_end(tiny_model_dir, prompt_file, tmp_path, capsys):
    rfile = tmp_path / "myreward.py"
    rfile.write_text(DIGITS_SRC)
    out = tmp_path / "cli"
    code = main(["online-dpo", f"model={tiny_model_dir}", f"data={prompt_file}", f"reward={rfile}:digits",
                 f"output_dir={out}", "max_steps=2", "batch_size=4", "max_new_tokens=6", "num_generations=3",
                 "loss=ipo", "progress=false", "log_every=1"])
    assert code == 0
    assert "done: model saved to" in capsys.readouterr().out
    assert len(metrics(out)) == 2 and load_model(str(out)) is not None


@pytest.mark.parametrize("extra, needle", [
    (["num_generations=1"], "bad value for 'num_generations'"),
    (["loss=dpo"], "bad value for 'loss'"),
    (["betta=0.2"], "did you mean 'beta'"),
    (["reward=no_such_reward"], "unknown reward source"),
])
def test_cli_online_dpo_bad_input_exit_2(tiny_model_dir, prompt_file, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code = main(["online-dpo", f"model={tiny_model_dir}", f"data={prompt_file}", f"output_dir={out}",
                 "progress=false", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()
