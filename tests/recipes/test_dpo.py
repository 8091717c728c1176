"""DPO recipe: one concatenated forward, cached reference log-probs, global normalisation over
pairs, adapter-off reference, SimPO without a reference, the CLI and its errors.

The loss formulas themselves are checked against hand computations in tests/unit/test_losses.py;
here only what that file does not cover (SimPO with label smoothing, the recipe's NLL term)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import alignkit.recipes.dpo as dpo_mod
from alignkit.cli import main
from alignkit.config import DPOConfig, load_config
from alignkit.data.preference import load_pairs, pair_collate
from alignkit.losses import dpo_loss
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes.dpo import (
    REF_FILE,
    compute_reference_logps,
    dpo_loss_fn,
    evaluate_pairs,
    pair_loss,
    reference_cache_key,
    sequence_logps,
    train_dpo,
)
from alignkit.toy import world
from alignkit.training.trainer import Trainer

from conftest import ROOT, free_port, write_jsonl

PY = sys.executable


def toy_pairs(tmp_path, n=16, name="pairs.jsonl", seed=0, split="train", **kw):
    return write_jsonl(tmp_path / name, world.preference_rows(n, seed=seed, split=split, **kw))


def naive_answer_logps(model, enc) -> float:
    """Independent reference: one row, no padding, full logits, log_softmax, summed over the
    answer tokens (labels != -100, shifted by one)."""
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1)
    total = 0.0
    for t in range(1, len(enc.input_ids)):
        if enc.labels[t] != -100:
            total += float(lp[t - 1, enc.input_ids[t]])
    return total


def cfg_for(model_dir, data, out, **kw) -> DPOConfig:
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), progress=False, tensorboard=False,
                batch_size=4, lr=5e-3, beta=0.5, log_every=1, logits_chunk_size=16)
    base.update(kw)
    return DPOConfig(**base)


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ forward


def test_one_concatenated_forward_equals_separate_forwards(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()
    # Both row forms: explicit message prompt, and implicit prompt in text transcripts.
    pairs, _ = load_pairs(str(toy_pairs(tmp_path, 5)), "train", tok, 512)
    implicit = [{"chosen": f"Human: {r['prompt']}\n\nAssistant: {r['chosen']}",
                 "rejected": f"Human: {r['prompt']}\n\nAssistant: {r['rejected']}"}
                for r in world.preference_rows(3, seed=1, as_text=True)]
    ipairs, _ = load_pairs(str(write_jsonl(tmp_path / "implicit.jsonl", implicit)), "train", tok, 512)
    for ps in (pairs, ipairs):
        mb = pair_collate(ps, tok.pad_token_id)
        assert mb["input_ids"].shape[0] == 2 * len(ps)
        with torch.no_grad():
            joint, n_joint = sequence_logps(model, mb, chunk_size=7)
            sep_c, n_c = sequence_logps(model, _side(ps, tok, "chosen"), 7)
            sep_r, n_r = sequence_logps(model, _side(ps, tok, "rejected"), 7)
        torch.testing.assert_close(joint, torch.cat([sep_c, sep_r]), atol=1e-5, rtol=1e-5)
        assert torch.equal(n_joint, torch.cat([n_c, n_r]))
        naive = [naive_answer_logps(model, p.chosen) for p in ps] + [naive_answer_logps(model, p.rejected) for p in ps]
        assert joint.tolist() == pytest.approx(naive, abs=1e-4, rel=1e-5)
        assert n_joint.tolist() == [p.chosen.n_trained for p in ps] + [p.rejected.n_trained for p in ps]


def _side(ps, tok, which):
    from alignkit.data.collate import pad_collate

    return pad_collate([getattr(p, which) for p in ps], tok.pad_token_id)


# ------------------------------------------------------------------------------------------ reference cache


def test_reference_cache_equals_on_the_fly_and_resume_reuses_it(tiny_model_dir, tmp_path, monkeypatch):
    data = toy_pairs(tmp_path, 12)
    out = tmp_path / "run"
    calls = []
    real = dpo_mod.compute_reference_logps
    monkeypatch.setattr(dpo_mod, "compute_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    train_dpo(cfg_for(tiny_model_dir, data, out, max_steps=3, save_every=2, ref_batch_size=5))
    assert calls == [1]
    cache = torch.load(out / REF_FILE, weights_only=True)
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(data), "train", tok, 1024)
    base = load_model(str(tiny_model_dir))
    want_c = [naive_answer_logps(base, p.chosen) for p in pairs]
    want_r = [naive_answer_logps(base, p.rejected) for p in pairs]
    assert cache["train"]["chosen"].tolist() == pytest.approx(want_c, abs=1e-4, rel=1e-5)
    assert cache["train"]["rejected"].tolist() == pytest.approx(want_r, abs=1e-4, rel=1e-5)
    key = reference_cache_key(cfg_for(tiny_model_dir, data, out), str(data), "train", pairs, base)
    assert cache["train"]["key"] == key
    # At step 1 the policy is the reference: implicit rewards are 0 (same numerics, to float error).
    first = metrics(out)[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)

    # Resume: the checkpoint holds trained weights, yet the cached values are reused, not recomputed.
    calls.clear()
    train_dpo(cfg_for(tiny_model_dir, data, out, max_steps=5, save_every=2, resume=True))
    assert calls == []
    steps = [r["step"] for r in metrics(out) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]  # 3 (final checkpoint of the first run) -> 4, 5

    # Anything that changes the tokens changes the key: a new max_length recomputes.
    short = cfg_for(tiny_model_dir, data, out, max_length=40)
    spairs, _ = load_pairs(str(data), "train", tok, 40)
    assert reference_cache_key(short, str(data), "train", spairs, base) != key
    # ... and so do other weights under the same model name
    with torch.no_grad():
        next(base.parameters()).mul_(1.001)
    assert reference_cache_key(cfg_for(tiny_model_dir, data, out), str(data), "train", pairs, base) != key


# ------------------------------------------------------------------------------------------ normalisation


def _grads(model_dir, tmp_path, mbs_idx, **kw):
    tok = load_tokenizer(str(model_dir))
    data = toy_pairs(tmp_path, 4, name="ragged.jsonl", p_format=0.5)
    pairs, _ = load_pairs(str(data), "train", tok, 1024)
    model = load_model(str(model_dir))
    cfg = cfg_for(model_dir, data, tmp_path / "g", **kw)
    # reference log-probs that differ from the policy, so the loss is not at its symmetric point
    ref = compute_reference_logps(model, pairs, tok.pad_token_id, 4, 16)
    ref = (ref[0] - 3.0 * torch.arange(4), ref[1] + 2.0)
    tr = Trainer(cfg, model, tok, recipe="dpo", total_steps=1, log=lambda s: None)
    mbs = [dpo_mod._pairs_batch(pairs, idx, tok.pad_token_id, ref) for idx in mbs_idx]
    ref_mode = "none" if cfg.loss == "simpo" else "precompute"
    m = tr.accumulate(mbs, dpo_loss_fn(cfg, ref_mode), lambda mb: mb["n_pairs"])
    return {n: p.grad.clone() for n, p in model.named_parameters()}, m


@pytest.mark.parametrize("kw", [dict(), dict(sft_weight=0.7), dict(loss="simpo", beta=2.0, simpo_gamma=0.3)])
def test_micro_batching_1x4_equals_2x2(tiny_model_dir, tmp_path, kw):
    g14, m14 = _grads(tiny_model_dir, tmp_path, [[0, 1, 2, 3]], **kw)
    g22, m22 = _grads(tiny_model_dir, tmp_path, [[0, 1], [2, 3]], **kw)
    g13, _ = _grads(tiny_model_dir, tmp_path, [[0], [1, 2, 3]], **kw)
    for k in g14:
        torch.testing.assert_close(g14[k], g22[k], atol=1e-6, rtol=1e-4, msg=k)
        torch.testing.assert_close(g14[k], g13[k], atol=1e-6, rtol=1e-4, msg=k)
    assert m14["units"] == m22["units"] == 4
    for k in m14:
        assert m14[k] == pytest.approx(m22[k], rel=1e-5, abs=1e-6), k
    assert ("nll" in m14) == ("sft_weight" in kw)


def test_loss_and_nll_term_by_hand(tiny_model_dir, tmp_path):
    """pair_loss = sum_pairs [dpo_loss + w * (-log pi(y_w) / |y_w|)], from independent log-probs."""
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(toy_pairs(tmp_path, 3)), "train", tok, 1024)
    model = load_model(str(tiny_model_dir)).eval()
    rc, rr = torch.tensor([-50.0, -60.0, -55.0]), torch.tensor([-52.0, -58.0, -57.0])
    w, beta = 0.3, 0.2
    cfg = DPOConfig(model="x", data="x", beta=beta, sft_weight=w)
    mb = dpo_mod._pairs_batch(pairs, [0, 1, 2], tok.pad_token_id, (rc, rr))
    with torch.no_grad():
        loss, m = pair_loss(model, mb, cfg, "precompute")
    pc = [naive_answer_logps(model, p.chosen) for p in pairs]
    pr = [naive_answer_logps(model, p.rejected) for p in pairs]
    nc = [p.chosen.n_trained for p in pairs]
    want = 0.0
    for i in range(3):
        h = (pc[i] - float(rc[i])) - (pr[i] - float(rr[i]))
        want += -math.log(1 / (1 + math.exp(-beta * h))) + w * (-pc[i] / nc[i])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(m["nll"]) == pytest.approx(sum(-pc[i] / nc[i] for i in range(3)), rel=1e-5)
    acc = sum((pc[i] - float(rc[i])) > (pr[i] - float(rr[i])) for i in range(3))
    assert float(m["rewards/accuracy"]) == acc
    assert float(m["logps/chosen_mean"]) == pytest.approx(sum(pc[i] / nc[i] for i in range(3)), rel=1e-5)


def test_simpo_label_smoothing_by_hand():
    """Not covered in test_losses.py: SimPO with the cDPO smoothing."""
    pw, pl = torch.tensor([-10.0, -30.0], dtype=torch.float64), torch.tensor([-12.0, -20.0], dtype=torch.float64)
    lw, ll, beta, gamma, eps = torch.tensor([4, 10]), torch.tensor([5, 8]), 2.0, 0.5, 0.2
    losses, _, _ = dpo_loss(pw, pl, None, None, beta=beta, loss_type="simpo", gamma=gamma, label_smoothing=eps,
                            chosen_lengths=lw, rejected_lengths=ll)

    def ls(x):
        return -math.log1p(math.exp(-x))

    for i in range(2):
        z = beta * (float(pw[i]) / int(lw[i]) - float(pl[i]) / int(ll[i])) - gamma
        assert float(losses[i]) == pytest.approx(-(1 - eps) * ls(z) - eps * ls(-z), rel=1e-12)


# ------------------------------------------------------------------------------------------ training works


def test_short_run_raises_reward_accuracy_and_margin(tiny_model_dir, tmp_path):
    data = toy_pairs(tmp_path, 16)
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, data, out, eval_data=str(data), max_steps=24, lr=1e-2, warmup_steps=2,
                  eval_every=12)
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(data), "train", tok, 1024)
    model = load_model(str(tiny_model_dir))
    ref = compute_reference_logps(model, pairs, tok.pad_token_id, 8, 16)
    before = evaluate_pairs(model, pairs, cfg, "precompute", tok.pad_token_id, ref)
    assert abs(before["eval_rewards/margin"]) < 1e-4  # policy == reference
    res = train_dpo(cfg)
    assert res["eval_rewards/accuracy"] >= 0.9
    assert res["eval_rewards/margin"] > 1.0
    assert res["eval_loss"] < 0.5 * math.log(2)
    evals = [r for r in metrics(out) if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[-1]["eval_loss"] <= evals[0]["eval_loss"]


# ------------------------------------------------------------------------------------------ adapters


def test_adapter_off_reference_equals_base_model(tiny_model_dir, tmp_path):
    from alignkit.models.peft import prepare_trainable

    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(toy_pairs(tmp_path, 4)), "train", tok, 1024)
    cfg = DPOConfig(model=str(tiny_model_dir), data="x", **{"peft": {"method": "lora", "r": 4}})
    model = prepare_trainable(load_model(str(tiny_model_dir)), cfg)
    assert dpo_mod.resolve_reference(cfg, model) == "adapter_off"
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: it must change the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    mb = pair_collate(pairs, tok.pad_token_id)
    model.train()
    loss, m = pair_loss(model, mb, cfg, "adapter_off")
    assert model.training  # train mode restored after the reference pass
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    base = load_model(str(tiny_model_dir)).eval()
    B = len(pairs)
    with torch.no_grad():
        want, _ = sequence_logps(base, mb, 16)
        policy, _ = sequence_logps(model, mb, 16)
        got = compute_reference_logps(model, pairs, tok.pad_token_id, 4, 16, adapter_off=True)
        # the same loss with the base model's log-probs handed in as a precomputed reference
        mb_pre = dict(mb, ref_chosen=want[:B], ref_rejected=want[B:])
        loss_pre, m_pre = pair_loss(model, mb_pre, cfg, "precompute")
    assert (policy - want).abs().max() > 1e-2  # the adapter is on for the policy
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(loss_pre), rel=1e-5)
    for k in m:
        assert float(m[k]) == pytest.approx(float(m_pre[k]), rel=1e-5, abs=1e-6), k


def test_lora_run_uses_adapter_off_and_simpo_loads_no_reference(tiny_model_dir, tmp_path, monkeypatch):
    data = toy_pairs(tmp_path, 8)
    loads = []
    real_load = dpo_mod.load_base_model
    monkeypatch.setattr(dpo_mod, "load_base_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    lora = {"peft": {"method": "lora", "r": 4}}
    out = tmp_path / "lora"
    train_dpo(cfg_for(tiny_model_dir, data, out, max_steps=2, **lora))
    assert not (out / REF_FILE).exists() and (out / "adapter_config.json").exists()
    first = metrics(out)[0]
    assert abs(first["rewards/chosen"]) < 1e-5  # LoRA starts as the identity: policy == reference
    assert loads == [1]

    def forbidden(*a, **k):
        raise AssertionError("simpo must not compute reference log-probs")

    monkeypatch.setattr(dpo_mod, "compute_reference_logps", forbidden)
    monkeypatch.setattr(dpo_mod, "reference_logps_context", forbidden)
    for name, extra in (("simpo_full", {}), ("simpo_lora", lora)):
        loads.clear()
        out = tmp_path / name
        train_dpo(cfg_for(tiny_model_dir, data, out, max_steps=2, loss="simpo", beta=2.0, **extra))
        assert loads == [1] and not (out / REF_FILE).exists()
        assert metrics(out)[0]["loss"] > 0


# ------------------------------------------------------------------------------------------ CLI


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-m", "alignkit", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_dpo_cli_end_to_end(tiny_model_dir, tmp_path):
    data = toy_pairs(tmp_path, 16)
    ev = toy_pairs(tmp_path, 8, name="eval.jsonl", split="eval")
    out = tmp_path / "out"
    res = run_cli("dpo", f"model={tiny_model_dir}", f"data={data}", f"eval_data={ev}", f"output_dir={out}",
                  "max_steps=6", "batch_size=2", "grad_accum=2", "lr=5e-3", "beta=0.5", "sft_weight=0.1",
                  "progress=false", "log_every=1", "eval_every=3", "tensorboard=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: model saved to" in res.stdout and "reference log-probs (train): computing" in res.stderr
    recs = metrics(out)
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 6 and len([r for r in recs if r["kind"] == "eval"]) == 2
    for k in ("loss", "nll", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
              "logps/chosen", "logps/rejected", "logps/chosen_mean", "logps/rejected_mean", "grad_norm"):
        assert k in train[-1], k
    assert train[0]["units"] == 4
    for f in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", REF_FILE, "curves.png"):
        assert (out / f).exists(), f


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["loss=dpo"], "bad value for 'loss'"),
        (["betta=0.1"], "did you mean 'beta'"),
        (["loss=ipo", "label_smoothing=0.1"], "label_smoothing is not defined for loss=ipo"),
        (["reference=adapter_off"], "reference=adapter_off needs an adapter"),
        (["@sft"], "missing columns"),
        (["@row"], "row 2"),
    ],
)
def test_bad_input_one_line_exit_2(tiny_model_dir, tmp_path, capsys, extra, needle):
    data = toy_pairs(tmp_path, 4)
    write_jsonl(tmp_path / "sft.jsonl", world.sft_rows(4))
    write_jsonl(tmp_path / "row.jsonl", world.preference_rows(1, as_text=True) + [{"prompt": "p", "chosen": "a", "rejected": ""}])
    out = tmp_path / "out"
    args = ["dpo", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "progress=false"]
    for e in extra:
        if e.startswith("@"):
            args[2] = f"data={tmp_path / (e[1:] + '.jsonl')}"
        else:
            args.append(e)
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("alignkit: error:") and needle in err[0], err
    assert not out.exists() or not (out / "config.json").exists()


def test_help_lists_dpo_keys(capsys):
    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("loss", "beta", "label_smoothing", "simpo_gamma", "sft_weight", "reference", "peft.method"):
        assert f"  {key} " in text, key
    cfg = load_config(DPOConfig, None, ["loss=simpo", "simpo_gamma=1.0", "beta=2"])
    assert cfg.loss == "simpo" and cfg.simpo_gamma == 1.0 and cfg.beta == 2.0


# ------------------------------------------------------------------------------------------ 2 ranks


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    """2 ranks x batch 2 (reference pass split across ranks) == 1 process x batch 4."""
    data = toy_pairs(tmp_path, 8)
    common = [f"model={tiny_model_dir}", f"data={data}", "max_steps=3", "lr=5e-3", "beta=0.5", "progress=false",
              "tensorboard=false", "logits_chunk_size=16", "log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([PY, "-m", "alignkit", "dpo", *common, "batch_size=4", f"output_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                          "-m", "alignkit", "dpo", *common, "batch_size=2", f"output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / REF_FILE, weights_only=True)["train"]
    b = torch.load(tmp_path / "two" / REF_FILE, weights_only=True)["train"]
    torch.testing.assert_close(a["chosen"], b["chosen"], atol=1e-5, rtol=1e-6)
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        for k in ("loss", "grad_norm", "rewards/margin", "units"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), k
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:  # Adam turns float-rounding differences of tiny gradients into up to ~lr/50
        torch.testing.assert_close(wa[k], wb[k], atol=3e-4, rtol=1e-3, msg=k)


# ------------------------------------------------------------------------------------------ length groups


def test_length_groups_cover_every_row_once_and_only_split_when_it_pays():
    from alignkit.recipes.dpo import length_groups

    need = [30, 200, 31, 198, 29, 120, 200, 119]
    groups = length_groups(need)
    assert sorted(i for rows, _ in groups for i in rows) == list(range(8))
    assert 1 < len(groups) <= 3
    for rows, T in groups:
        assert T == max(need[i] for i in rows)
    assert sum(len(rows) * T for rows, T in groups) < 0.75 * 8 * 200
    assert length_groups([50, 50, 50]) == [([0, 1, 2], 50)]
    assert len(length_groups([100, 99, 101, 98])) == 1  # a second forward would save too little
    assert length_groups([7]) == [([0], 7)]


def _uneven_pairs(tok, tmp_path):
    """Pairs whose prompts differ a lot in length, so `sequence_logps` splits the batch."""
    rows = world.preference_rows(6, seed=2)
    for i, r in enumerate(rows):
        if i % 2:
            r["prompt"] = [{"role": "user", "content": "\n".join([r["prompt"][0]["content"]] * 4)}]
    pairs, _ = load_pairs(str(write_jsonl(tmp_path / "uneven.jsonl", rows)), "train", tok, 1024)
    return pairs


def test_grouped_forward_equals_one_padded_forward_values_and_grads(tiny_model_dir, tmp_path, monkeypatch):
    """Rows of very different lengths run in several forwards of similar length; the log-probs and
    the gradients equal those of the single padded (2B, T) forward (the code before the split)."""
    from alignkit.ops.logprobs import causal_lm_token_logps

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).train()
    mb = pair_collate(_uneven_pairs(tok, tmp_path), tok.pad_token_id)
    calls = []
    real = dpo_mod.causal_lm_token_logps

    def spy(*a, **k):
        calls.append(a[1].shape)
        return real(*a, **k)

    monkeypatch.setattr(dpo_mod, "causal_lm_token_logps", spy)
    model.zero_grad()
    got, n = sequence_logps(model, mb, chunk_size=16)
    (got * torch.linspace(0.5, 1.5, got.numel())).sum().backward()
    g_got = [p.grad.clone() for p in model.parameters()]
    assert len(calls) >= 2 and max(s[1] for s in calls) == mb["input_ids"].shape[1]
    assert min(s[1] for s in calls) < 0.6 * mb["input_ids"].shape[1]  # the short rows ran without the padding

    model.zero_grad()
    lp = causal_lm_token_logps(model, mb["input_ids"], attention_mask=mb["attention_mask"],
                               position_ids=mb["position_ids"], targets=mb["targets"], chunk_size=16)
    want = torch.where(mb["targets"] != -100, lp, 0.0).sum(-1)
    (want * torch.linspace(0.5, 1.5, want.numel())).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert n.tolist() == (mb["targets"] != -100).sum(-1).tolist()
    for a, b in zip(g_got, (p.grad for p in model.parameters())):  # float32 sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_orpo_loss_and_grads_equal_a_full_logits_computation(tiny_model_dir, tmp_path):
    """ORPO through the lean path (grouped forwards, hand-written head backward) against an
    independent one: a full forward per row, log_softmax of all logits, the formula by hand."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).train()
    pairs = _uneven_pairs(tok, tmp_path)
    cfg = DPOConfig(model="x", data="x", loss="orpo", orpo_lambda=0.3)
    model.zero_grad()
    loss, _ = pair_loss(model, pair_collate(pairs, tok.pad_token_id), cfg, "none")
    loss.backward()
    g_lean = [p.grad.clone() for p in model.parameters()]

    def answer_logp(enc):
        ids = torch.tensor([enc.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt = torch.tensor(enc.input_ids[1:])
        keep = torch.tensor([lab != -100 for lab in enc.labels[1:]])
        return logp.gather(-1, tgt[:, None]).squeeze(-1)[keep].sum(), int(keep.sum())

    model.zero_grad()
    want = 0.0
    for p in pairs:
        (lw, nw), (ll, nl) = answer_logp(p.chosen), answer_logp(p.rejected)
        mw, ml = lw / nw, ll / nl
        log_odds = (mw - torch.log(-torch.expm1(mw))) - (ml - torch.log(-torch.expm1(ml)))
        want = want - mw - 0.3 * torch.nn.functional.logsigmoid(log_odds)
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(g_lean, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
