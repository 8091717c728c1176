"""Reward models: last-token selection, one-pass pairs, the two losses, calibration, training on
toy pairs and on HH-RLHF, save -> load -> score, LoRA, resume, CLI and bad input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignkit.cli import main
from alignkit.config import RMConfig
from alignkit.data.preference import load_pairs, pair_collate, pair_parts
from alignkit.models import load_tokenizer
from alignkit.models.reward import (
    RewardModel,
    RewardSpec,
    expected_calibration_error,
    fit_temperature,
    last_token_index,
    load_reward_backbone,
    preference_nll,
    preference_probability,
    rewards_from_logits,
    sequence_logits,
)
from alignkit.recipes.rm import evaluate_pairs, rm_loss_fn, train_rm

from conftest import SHARED_DATA, write_jsonl

HH = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def text_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose better answer is the right sum, in text form, of varied lengths."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        pad = " ".join(["please"] * rng.randint(0, 6))
        rows.append({"prompt": f"Human: {a} + {b}? {pad}\n\nAssistant:", "chosen": f" {a + b}.",
                     "rejected": f" {a + b + rng.randint(1, 9)} maybe"})
    return rows


def toy_rows(n: int, split: str) -> list[dict]:
    from alignkit.toy import world

    return world.preference_rows(n, seed=0, split=split)


def cfg_for(model_dir, out, data, **kw) -> RMConfig:
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), batch_size=4, max_steps=3, lr=1e-3,
                max_length=128, progress=False, tensorboard=False, log_every=1, seed=0)
    base.update(kw)
    return RMConfig(**base)


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


# ------------------------------------------------------------------------------------ the network


def test_last_token_index_any_padding_side():
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert last_token_index(m).tolist() == [2, 0, 4, 4]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_head_reads_last_real_token_right_padding(tiny_model_dir, tok, pad_is_eos):
    """Batched, right-padded scores equal each sequence scored alone (no padding) by a plain
    per-position computation; with pad == eos the trailing eos is still the token read."""
    torch.manual_seed(0)
    model, fresh = load_reward_backbone(str(tiny_model_dir), RewardSpec())
    assert fresh
    eos = tok.eos_token_id
    pad = eos if pad_is_eos else tok.pad_token_id
    seqs = [[1, 50, 60, 70, eos], [1, 80, eos], [1, 90, 91, 92, 93, 94, eos]]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    batched = sequence_logits(model.eval(), ids, mask)[:, 0]
    for i, s in enumerate(seqs):
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([s])).last_hidden_state[0]  # (len, H)
        ref = h @ model.score.weight[0]
        assert torch.allclose(batched[i], ref[-1], atol=1e-5)  # the last real token: eos
        assert not torch.allclose(batched[i], ref[-2], atol=1e-3)  # not the token before it


def test_saved_model_agrees_with_plain_transformers(tiny_model_dir, tok, tmp_path):
    """pad != eos: transformers' own forward (rightmost non-pad token) gives our scores on a padded
    batch. pad == eos: the saved config has pad_token_id null, transformers scores an unpadded
    sequence (batch 1) like we do and refuses padded batches."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.reward import hf_pad_token_id

    torch.manual_seed(0)
    model, _ = load_reward_backbone(str(tiny_model_dir), RewardSpec())
    model.config.pad_token_id = hf_pad_token_id(tok)
    rm = RewardModel(model, tok, RewardSpec(max_length=128))
    prompts, responses = ["Human: 2 + 2?\n\nAssistant:", "Hi"], [" 4.", " Hello there, how are you today?"]
    ours = rm.score(prompts, responses)
    rm.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    enc = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    T = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (T - len(e)) for e in enc])
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits[:, 0]
    assert torch.allclose(theirs, torch.tensor(ours), atol=1e-5)

    tok2 = load_tokenizer(str(tiny_model_dir))
    tok2.pad_token = tok2.eos_token
    rm2 = RewardModel(model, tok2, RewardSpec(max_length=128))
    model.config.pad_token_id = hf_pad_token_id(tok2)
    assert model.config.pad_token_id is None
    rm2.save_pretrained(tmp_path / "rm2")
    hf2 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm2").eval()
    with torch.no_grad():
        single = [float(hf2(input_ids=torch.tensor([e])).logits[0, 0]) for e in enc]
        with pytest.raises(ValueError):
            hf2(input_ids=ids)
    assert single == pytest.approx(rm2.score(prompts, responses), abs=1e-5)


def test_one_forward_pass_equals_two(tiny_model_dir, tok, tmp_path):
    """Chosen and rejected in one 2B-row batch: same rewards, loss and gradients as two passes."""
    data = write_jsonl(tmp_path / "p.jsonl", text_pairs(6))
    pairs, _ = load_pairs(str(data), "train", tok, 128)
    torch.manual_seed(0)
    model, _ = load_reward_backbone(str(tiny_model_dir), RewardSpec())

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    batch = pair_collate(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 12
    loss_one, _ = rm_loss_fn(RewardSpec())(model, batch)
    r_one = sequence_logits(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])[:, 0]
    g_one = grads_of(loss_one)

    from alignkit.data.collate import pad_collate

    cb = pad_collate([p.chosen for p in pairs], tok.pad_token_id)
    rb = pad_collate([p.rejected for p in pairs], tok.pad_token_id)
    r_w = sequence_logits(model, cb["input_ids"], cb["attention_mask"], cb["position_ids"])[:, 0]
    r_l = sequence_logits(model, rb["input_ids"], rb["attention_mask"], rb["position_ids"])[:, 0]
    loss_two = -F.logsigmoid(r_w - r_l).sum()
    g_two = grads_of(loss_two)
    assert torch.allclose(r_one, torch.cat([r_w, r_l]).detach(), atol=1e-5)
    assert abs(float(loss_one.detach()) - float(loss_two.detach())) < 1e-4
    assert g_one.keys() == g_two.keys() and "score.weight" in g_one
    for k in g_one:
        assert torch.allclose(g_one[k], g_two[k], atol=1e-5, rtol=1e-4), k
    assert not any("lm_head" in n for n, _ in model.named_parameters())


def test_loss_fn_margin_and_centering_match_hand_computation(tiny_model_dir, tok, tmp_path):
    rows = text_pairs(4)
    for i, r in enumerate(rows):
        r["margin"] = 0.5 * i
    pairs, _ = load_pairs(str(write_jsonl(tmp_path / "m.jsonl", rows)), "train", tok, 128)
    torch.manual_seed(0)
    model, _ = load_reward_backbone(str(tiny_model_dir), RewardSpec())
    with torch.no_grad():
        model.score.weight.mul_(50)  # rewards of order 1, so every term matters
    batch = pair_collate(pairs, tok.pad_token_id)
    loss, m = rm_loss_fn(RewardSpec(), center_coef=0.1)(model, batch)
    r = sequence_logits(model, batch["input_ids"], batch["attention_mask"]).detach()[:, 0].tolist()
    rw, rl = r[:4], r[4:]
    ref = sum(math.log1p(math.exp(-(w - l - 0.5 * i))) + 0.1 * (w + l) ** 2 for i, (w, l) in enumerate(zip(rw, rl)))
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    assert float(m["margin"]) == pytest.approx(sum(rw) - sum(rl), abs=1e-5)
    assert float(m["accuracy"]) == sum(w > l for w, l in zip(rw, rl))


# ------------------------------------------------------------------------------------ distributional


def test_distributional_reward_statistics():
    torch.manual_seed(0)
    logits = torch.randn(5, 6) * 2
    spec = RewardSpec(kind="distributional", num_scores=6, temperature=1.7)
    p = torch.softmax(logits.double() / 1.7, -1)
    s = torch.arange(1, 7, dtype=torch.float64)
    mean = (p * s).sum(-1)
    assert torch.allclose(rewards_from_logits(logits, spec).double(), mean, atol=1e-6)
    spec.reward_stat = "mode"
    assert rewards_from_logits(logits, spec).tolist() == (p.argmax(-1) + 1).double().tolist()
    spec.reward_stat = "median"
    med = [next(i + 1 for i in range(6) if float(p[b, : i + 1].sum()) >= 0.5) for b in range(5)]
    assert rewards_from_logits(logits, spec).tolist() == med
    spec.reward_stat = "mean_minus_std"
    std = ((p * (s - mean[:, None]) ** 2).sum(-1)).sqrt()
    assert torch.allclose(rewards_from_logits(logits, spec).double(), mean - std, atol=1e-6)


def test_preference_probability_against_brute_force():
    torch.manual_seed(1)
    zw, zl = torch.randn(7, 5), torch.randn(7, 5)
    pw, pl = torch.softmax(zw.double(), -1), torch.softmax(zl.double(), -1)
    strict = torch.tensor([sum(float(pw[b, i] * pl[b, j]) for i in range(5) for j in range(5) if i > j)
                           for b in range(7)], dtype=torch.float64)
    tie = (pw * pl).sum(-1)
    q = preference_probability(zw, zl, "distributional")
    assert torch.allclose(q, strict + 0.5 * tie, atol=1e-9)
    assert torch.allclose(q + preference_probability(zl, zw, "distributional"), torch.ones(7, dtype=torch.float64))
    from alignkit.losses import distributional_preference_loss

    assert float(distributional_preference_loss(zw, zl)) == pytest.approx(float(-strict.log().mean()), rel=1e-5)


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right), 0.9 (wrong: q = 0.1 means the rejected side was predicted), 0.6 (right)
    q = torch.tensor([0.9, 0.1, 0.6])
    # bin [0.9, 0.95): 2 pairs, accuracy 1/2, confidence 0.9 -> |0.5 - 0.9| * 2/3; bin [0.6, 0.65): |1 - 0.6| / 3
    assert expected_calibration_error(q) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)


def overconfident_pairs(n: int = 400, seed: int = 0):
    """Score distributions that say 'y_w better' with ~99% confidence, while the first side truly
    wins only ~75% of the time."""
    g = torch.Generator().manual_seed(seed)
    K = 10
    centre_w = torch.randint(5, 9, (n,), generator=g)
    centre_l = centre_w - 3
    ks = torch.arange(K)
    zw = -2.0 * (ks[None] - centre_w[:, None]).float() ** 2
    zl = -2.0 * (ks[None] - centre_l[:, None]).float() ** 2
    flip = torch.rand(n, generator=g) < 0.25  # the observed winner is the other side
    chosen = torch.where(flip[:, None], zl, zw)
    rejected = torch.where(flip[:, None], zw, zl)
    return chosen + 0.3 * torch.randn(n, K, generator=g), rejected + 0.3 * torch.randn(n, K, generator=g)


def test_temperature_scaling_fixes_overconfidence():
    w, l = overconfident_pairs()
    q1 = preference_probability(w, l, "distributional", 1.0)
    T = fit_temperature(w, l)
    qT = preference_probability(w, l, "distributional", T)
    assert T > 1.5
    assert preference_nll(qT) < preference_nll(q1) - 0.2
    assert expected_calibration_error(qT) < 0.5 * expected_calibration_error(q1)
    # the recipe's held-out report: cross-fitted, and T stored is the one fitted on all pairs
    spec = RewardSpec(kind="distributional", num_scores=10)
    m, T2 = evaluate_pairs(w, l, spec)
    assert T2 == pytest.approx(T)
    assert m["eval_nll_calibrated"] < m["eval_nll"] and m["eval_ece_calibrated"] < m["eval_ece"]
    assert m["eval_accuracy"] == pytest.approx(0.75, abs=0.06)
    # never worse than T = 1 on the data it is fitted on, even when T = 1 is already right
    w2, l2 = torch.randn(50, 10), torch.randn(50, 10)
    assert preference_nll(preference_probability(w2, l2, "distributional", fit_temperature(w2, l2))) <= \
        preference_nll(preference_probability(w2, l2, "distributional", 1.0)) + 1e-12


# ------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def toy_run(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_rm")
    train = write_jsonl(d / "train.jsonl", toy_rows(640, "train"))
    ev = write_jsonl(d / "eval.jsonl", toy_rows(200, "eval"))
    cfg = cfg_for(tiny_model_dir, d / "run", train, eval_data=str(ev), max_steps=40, batch_size=16, lr=3e-3,
                  warmup_steps=4, log_every=10, eval_every=20)
    res = train_rm(cfg)
    return cfg, res, d


def test_rm_accuracy_rises_above_chance_on_toy_pairs(toy_run, tok):
    cfg, res, d = toy_run
    # the same network before training (same seed -> same head init): its rewards are ~0, NLL ~ log 2
    torch.manual_seed(cfg.seed)
    model, _ = load_reward_backbone(cfg.model, RewardSpec())
    pairs, _ = load_pairs(str(d / "eval.jsonl"), "train", tok, cfg.max_length)
    b = pair_collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        r = sequence_logits(model, b["input_ids"], b["attention_mask"])[:, 0]
    nll_before = float(-F.logsigmoid(r[:200] - r[200:]).mean())
    assert res["eval_pairs"] == 200
    assert res["eval_loss"] < nll_before - 0.1, (nll_before, res)
    assert res["eval_accuracy"] >= 0.62, res  # chance is 0.5 (200 pairs: one standard deviation ~0.035)
    # what a tiny random-init network learns in 40 steps: the wrong-format answers, every one of them
    rm = RewardModel.from_pretrained(cfg.output_dir)
    rows = [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
    fmt = [r for r in rows if r["mistake"] == "format"]
    won = torch.tensor(rm.score([r["prompt"] for r in fmt], [r["chosen"] for r in fmt])) > \
        torch.tensor(rm.score([r["prompt"] for r in fmt], [r["rejected"] for r in fmt]))
    assert len(fmt) > 30 and float(won.float().mean()) >= 0.9
    train, evals = metrics(Path(cfg.output_dir))
    assert len(evals) == 2 and len(train) == 4
    assert train[-1]["loss"] < math.log(2)


def test_saved_rm_scores_text_like_training_scored_pairs(toy_run):
    """RewardModel.from_pretrained(...).score on the raw eval rows reproduces the held-out accuracy
    and margin that training logged from its own (token-level) pipeline."""
    cfg, res, d = toy_run
    rm = RewardModel.from_pretrained(cfg.output_dir)
    assert rm.spec.kind == "scalar" and rm.spec.max_length == cfg.max_length
    rows = [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    rw = rm.score(prompts, [r["chosen"] for r in rows])
    rl = rm.score(prompts, [r["rejected"][0]["content"] for r in rows], batch_size=7)  # text response, other batching
    gap = torch.tensor(rw) - torch.tensor(rl)
    assert float((gap > 0).double().mean()) == pytest.approx(res["eval_accuracy"], abs=1e-9)
    assert float(gap.mean()) == pytest.approx(res["eval_margin"], abs=1e-4)


def test_distributional_training_calibration_and_round_trip(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(160, "train"))
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", train, kind="distributional", num_scores=5, max_steps=8,
                  batch_size=8, eval_fraction=0.2)
    res = train_rm(cfg)
    assert res["eval_pairs"] == 32
    for k in ("eval_entropy", "eval_ece", "eval_ece_calibrated", "eval_nll", "eval_nll_calibrated", "eval_temperature"):
        assert math.isfinite(res[k]), k
    assert 0 < res["eval_entropy"] <= math.log(5) + 1e-6
    rm = RewardModel.from_pretrained(cfg.output_dir)
    assert rm.spec.kind == "distributional" and rm.spec.num_scores == 5
    assert rm.spec.temperature == pytest.approx(res["eval_temperature"])
    probs = torch.tensor(rm.score_distribution(["Hi"], [" there"]))
    assert probs.shape == (1, 5) and abs(float(probs.sum()) - 1) < 1e-5
    assert rm.score(["Hi"], [" there"])[0] == pytest.approx(float((probs[0] * torch.arange(1, 6)).sum()), abs=1e-5)


def test_hh_rlhf_loads_as_is_and_trains(tiny_model_dir, tmp_path, capfd):
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        first = [json.loads(next(f)) for _ in range(5)]
    for i, row in enumerate(first):
        p, c, r = pair_parts(row, f"row {i}")
        assert p.endswith("\n\nAssistant:") and row["chosen"] == p + c and row["rejected"] == p + r
    cfg = cfg_for(tiny_model_dir, tmp_path / "hh", HH, max_steps=3, batch_size=4, eval_fraction=0.01)
    res = train_rm(cfg)
    err = capfd.readouterr().err
    assert "2312/2312 rows" in err
    train, _ = metrics(tmp_path / "hh")
    assert len(train) == 3 and all(math.isfinite(t["loss"]) for t in train)
    assert res["eval_pairs"] == 23 and math.isfinite(res["eval_loss"])


def test_resume_is_exact_and_restores_the_head(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", text_pairs(32))
    full = cfg_for(tiny_model_dir, tmp_path / "full", data, max_steps=6, eval_fraction=0, save_every=3)
    train_rm(full)
    step3 = next((tmp_path / "full" / "checkpoints").glob("step-*3"))
    train_rm(full.model_copy(update={"output_dir": str(tmp_path / "part"), "resume": str(step3)}))
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and "score.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = metrics(tmp_path / "full")[0], metrics(tmp_path / "part")[0]
    assert [r["loss"] for r in la[3:]] == [r["loss"] for r in lb] and len(lb) == 3


def test_lora_trains_the_head_and_loads_back(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", text_pairs(40))
    cfg = cfg_for(tiny_model_dir, tmp_path / "lora", data, max_steps=4, eval_fraction=0.2,
                  peft={"method": "lora", "r": 4})
    res = train_rm(cfg)
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "reward_config.json").is_file()
    rm = RewardModel.from_pretrained(out)
    torch.manual_seed(cfg.seed)
    init, _ = load_reward_backbone(str(tiny_model_dir), RewardSpec())
    assert not torch.equal(rm.model.score.weight, init.score.weight)  # the head trained and was saved
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    pairs, _ = load_pairs(str(data), "train", load_tokenizer(str(tiny_model_dir)), 128)
    from alignkit.recipes.rm import split_holdout

    _, held = split_holdout(list(range(len(rows))), 0.2, cfg.seed)
    rw = rm.score([rows[i]["prompt"] for i in held], [rows[i]["chosen"] for i in held])
    rl = rm.score([rows[i]["prompt"] for i in held], [rows[i]["rejected"] for i in held])
    assert float((torch.tensor(rw) - torch.tensor(rl)).mean()) == pytest.approx(res["eval_margin"], abs=1e-4)


# ------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", text_pairs(24))
    out = tmp_path / "out"
    rc = main(["rm", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_steps=2", "batch_size=4",
               "eval_fraction=0.25", "kind=scalar", "center_coef=0.01", "progress=false"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    assert "done: model saved to" in cap.out and "eval_accuracy=" in cap.out
    assert "eval @ step 2:" in cap.err
    conf = json.loads((out / "config.json").read_text())
    assert conf["alignkit_reward"]["kind"] == "scalar" and conf["id2label"] == {"0": "reward"}
    assert conf["architectures"] == ["LlamaForSequenceClassification"]
    assert len(metrics(out)[1]) == 1
    assert len(RewardModel.from_pretrained(out).score(["a"], ["b"])) == 1


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"}],
         "row 2: 'chosen' is empty"),
        ([{"prompt": "q", "answer": "a"}], "missing columns"),
        ([{"chosen": "x", "rejected": "y"}], "row 1"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}], "'margin' must be a number"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, rows, needle):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    rc = main(["rm", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "progress=false"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("alignkit: error:") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_pass_equals_full_sequences(tiny_model_dir, tok, tmp_path, attn):
    """One row per pair [prompt | y_w | y_l] with the response-isolating mask: the same rewards,
    loss and gradients as the 2B full sequences."""
    from alignkit.models.reward import shared_prompt_mask, shared_prompt_unsupported
    from alignkit.recipes.rm import shared_prompt_agrees, shared_prompt_collate

    rows = [dict(r, margin=float(i % 2)) for i, r in enumerate(text_pairs(6, seed=3))]
    pairs, _ = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)), "train", tok, 128)
    torch.manual_seed(0)
    model, _ = load_reward_backbone(str(tiny_model_dir), RewardSpec())
    model.set_attn_implementation(attn)
    assert shared_prompt_unsupported(model) is None
    full, shared = pair_collate(pairs, tok.pad_token_id), shared_prompt_collate(pairs, tok.pad_token_id)
    assert shared["input_ids"].shape[0] == 6 and full["input_ids"].shape[0] == 12
    assert shared["n_tokens"] == int(full["attention_mask"].sum())
    assert int((shared["segments"] == 0).sum()) > 6 * 5  # the prompts really are shared
    out = {}
    for name, b in (("full", full), ("shared", shared)):
        model.zero_grad()
        loss, m = rm_loss_fn(RewardSpec(), center_coef=0.05)(model, b)
        loss.backward()
        out[name] = (float(loss.detach()), float(m["margin"]),
                     {n: p.grad.clone() for n, p in model.named_parameters()})
    assert out["full"][0] == pytest.approx(out["shared"][0], abs=1e-5)
    assert out["full"][1] == pytest.approx(out["shared"][1], abs=1e-5)
    for k, g in out["full"][2].items():
        assert torch.allclose(g, out["shared"][2][k], atol=1e-5, rtol=1e-4), k
    assert shared_prompt_agrees(model, pairs, tok.pad_token_id)[0]
    model.config.sliding_window = 64  # a custom mask would bypass the window: not used then
    assert "sliding-window" in shared_prompt_unsupported(model)
    # the mask itself, for a row [p p | w w | l | pad]
    seg = torch.tensor([[0, 0, 1, 1, 2, 3]])
    m = shared_prompt_mask(seg, "sdpa", torch.float32)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0],
                 [0, 0, 0, 0, 0, 1]]


def test_null_margin_means_no_margin(tok, tmp_path):
    rows = [dict(r, margin=m) for r, m in zip(text_pairs(3, seed=1), (1.5, None, 0.0))]
    pairs, _ = load_pairs(str(write_jsonl(tmp_path / "m.jsonl", rows)), "train", tok, 128)
    assert [p.margin for p in pairs] == [1.5, None, 0.0]
