"""The shared loop: global normalisation (1x8 = 4x2 = 2 ranks x 4), schedules, NaN stop,
exact resume after SIGKILL, packing equivalence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.config import SFTConfig
from alignkit.data.chat import encode_messages
from alignkit.data.collate import IGNORE, n_trained, pack_collate, pad_collate
from alignkit.models import load_model, load_tokenizer
from alignkit.ops.logprobs import causal_lm_token_logps
from alignkit.recipes.sft import sft_loss_fn
from alignkit.training.trainer import Trainer, TrainingDiverged

from conftest import ROOT, chat_rows, free_port, write_jsonl

PY = sys.executable


def ragged_rows(tok, n=8):
    """Rows of clearly different lengths, so a per-micro-batch mean would weight tokens unequally."""
    rows = []
    for i, r in enumerate(chat_rows(n)):
        msgs = r["messages"][: 3 if i % 2 else 5]
        msgs[-1] = dict(msgs[-1], content=msgs[-1]["content"] + " ещё" * (3 * i))
        rows.append(encode_messages(tok, msgs))
    return rows


def grads_for(model_dir, tmp_path, splits: list[int], packing=False) -> dict:
    tok = load_tokenizer(str(model_dir))
    rows = ragged_rows(tok)
    model = load_model(str(model_dir))
    cfg = SFTConfig(model=str(model_dir), output_dir=str(tmp_path / "run"), progress=False, tensorboard=False)
    tr = Trainer(cfg, model, tok, recipe="sft", total_steps=1, log=lambda s: None)
    mbs, i = [], 0
    for k in splits:
        part = rows[i:i + k]
        mbs.append(pack_collate(part) if packing else pad_collate(part, tok.pad_token_id))
        i += k
    m = tr.accumulate(mbs, sft_loss_fn(64), n_trained)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, m["loss"]


def assert_grads_close(a, b, atol=1e-6):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_accumulation_1x8_equals_4x2_and_packed(tiny_model_dir, tmp_path):
    g18, l18 = grads_for(tiny_model_dir, tmp_path, [8])
    g42, l42 = grads_for(tiny_model_dir, tmp_path, [2, 2, 2, 2])
    g_uneven, _ = grads_for(tiny_model_dir, tmp_path, [1, 3, 4])
    gp, lp = grads_for(tiny_model_dir, tmp_path, [2, 2, 2, 2], packing=True)
    assert abs(l18 - l42) < 1e-6 and abs(l18 - lp) < 1e-5
    assert_grads_close(g18, g42)
    assert_grads_close(g18, g_uneven)
    assert_grads_close(g18, gp, atol=1e-5)


def test_naive_per_microbatch_mean_would_differ(tiny_model_dir):
    """Guards the test above: with these ragged rows, averaging per micro-batch is wrong."""
    tok = load_tokenizer(str(tiny_model_dir))
    rows = ragged_rows(tok)
    model = load_model(str(tiny_model_dir))
    full = pad_collate(rows, tok.pad_token_id)
    lp = causal_lm_token_logps(model, full["input_ids"], full["attention_mask"], full["position_ids"], full["targets"])
    m = full["targets"] != IGNORE
    token_mean = float(-(lp * m).sum().detach() / m.sum())
    per_mb = []
    for k in range(0, 8, 2):
        b = pad_collate(rows[k:k + 2], tok.pad_token_id)
        l2 = causal_lm_token_logps(model, b["input_ids"], b["attention_mask"], b["position_ids"], b["targets"])
        mm = b["targets"] != IGNORE
        per_mb.append(float(-(l2 * mm).sum().detach() / mm.sum()))
    assert abs(sum(per_mb) / 4 - token_mean) > 1e-3


DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_trainer import grads_for
from alignkit.training.dist import init_distributed, shutdown
d = init_distributed()
from pathlib import Path
import test_trainer as T
tok_dir = Path(sys.argv[1])
# rank r takes rows [4r, 4r+4) of the same 8 rows as the single-process run, as run_offline does
orig = T.ragged_rows
T.ragged_rows = lambda tok, n=8: orig(tok, n)[4 * d.rank: 4 * d.rank + 4]
g, loss = grads_for(tok_dir, Path(sys.argv[2]) / f"r{d.rank}", [2, 2])
if d.rank == 0:
    torch.save({"grads": g, "loss": loss}, Path(sys.argv[2]) / "ddp.pt")
# left to interpreter exit, gloo's threads can abort rank 1 after the work is done
shutdown()
"""


def test_ddp_two_ranks_x4_equals_single_process(tiny_model_dir, tmp_path):
    script = tmp_path / "ddp_grads.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    res = subprocess.run(
        [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
         str(tiny_model_dir), str(tmp_path), str(Path(__file__).resolve().parent)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    g18, l18 = grads_for(tiny_model_dir, tmp_path, [8])
    assert abs(ddp["loss"] - l18) < 1e-6
    assert_grads_close(ddp["grads"], g18)


def test_schedules(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir))
    lrs = {}
    for sched in ("cosine", "linear", "constant"):
        cfg = SFTConfig(model="x", output_dir=str(tmp_path / sched), lr=1.0, warmup_steps=2, schedule=sched,
                        progress=False, tensorboard=False)
        tr = Trainer(cfg, model, None, recipe="t", total_steps=12, log=lambda s: None)
        lrs[sched] = [tr._lr_lambda(s) for s in range(12)]
    assert lrs["cosine"][:2] == [0.5, 1.0] and lrs["linear"][:2] == [0.5, 1.0]
    assert lrs["constant"][2:] == [1.0] * 10
    assert lrs["linear"][2] == 1.0 and abs(lrs["linear"][7] - 0.5) < 1e-9
    assert abs(lrs["cosine"][7] - 0.5) < 1e-9 and lrs["cosine"][-1] < 0.03


def test_nan_loss_stops_before_update_and_keeps_checkpoint(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    cfg = SFTConfig(model="x", output_dir=str(tmp_path / "run"), progress=False, tensorboard=False)
    tr = Trainer(cfg, model, tok, recipe="t", total_steps=3, log=lambda s: None)
    tr.prepare_run_dir()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mb = pad_collate(ragged_rows(tok, 2), tok.pad_token_id)

    def nan_loss(m, b):
        loss, _ = sft_loss_fn(64)(m, b)
        return loss * float("nan"), {}

    m = tr.accumulate([mb], nan_loss, n_trained)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        tr.optimizer_step(m)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert (tmp_path / "run" / "checkpoints" / "step-0000000" / "trainer_state.json").exists()


def _sft_cmd(model_dir, data, out, *extra):
    return [PY, "-m", "alignkit", "sft", f"model={model_dir}", f"data={data}", f"output_dir={out}",
            "max_steps=40", "batch_size=2", "grad_accum=2", "lr=3e-3", "warmup_steps=3", "progress=false",
            "tensorboard=false", "plot=false", "log_every=1", "logits_chunk_size=16", *extra]


def _final_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.run(_sft_cmd(tiny_model_dir, data, tmp_path / "ref"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_sft_cmd(tiny_model_dir, data, out, "save_every=5", "save_total_limit=1"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-0000010").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before the kill; the test proves nothing"
    res = subprocess.run(_sft_cmd(tiny_model_dir, data, out, "save_every=5", "save_total_limit=1", "resume=true"),
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log has one record per step, no duplicates from the killed part
    import json

    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 41))


def test_per_sample_losses_equal_packed_and_unpacked(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    rows = ragged_rows(tok, 5)
    padded = pad_collate(rows, tok.pad_token_id)
    packed = pack_collate(rows)
    with torch.no_grad():
        lp_pad = causal_lm_token_logps(model, padded["input_ids"], padded["attention_mask"], padded["position_ids"],
                                       padded["targets"])
        lp_pack = causal_lm_token_logps(model, packed["input_ids"], None, packed["position_ids"], packed["targets"])
    start = 0
    for i, r in enumerate(rows):
        n = len(r)
        per_row_pad = lp_pad[i, :n]
        per_row_pack = lp_pack[0, start:start + n]
        torch.testing.assert_close(per_row_pack, per_row_pad, atol=1e-5, rtol=1e-5)
        assert float(per_row_pad.sum()) != 0.0
        start += n
    # and packing without the boundary handling would differ: one long document's logps
    with torch.no_grad():
        lp_leak = causal_lm_token_logps(model, packed["input_ids"], None,
                                        torch.arange(packed["input_ids"].shape[1])[None], packed["targets"])
    n0 = len(rows[0])
    assert not torch.allclose(lp_leak[0, n0:n0 + len(rows[1])], lp_pad[1, :len(rows[1])], atol=1e-4)


def test_bf16_autocast_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    res = subprocess.run(_sft_cmd(tiny_model_dir, data, tmp_path / "bf16", "dtype=bfloat16", "max_steps=6"),
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(isinstance(x, float) and x == x for x in losses)


def test_torchrun_sft_two_processes(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    out = tmp_path / "ddp"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "alignkit",
           *_sft_cmd(tiny_model_dir, data, out, "max_steps=4")[3:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    import json

    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # written once, by rank 0


def test_batch_with_nothing_to_train_is_a_logged_skipped_step(tiny_model_dir, tmp_path):
    """Every label of the global batch masked: no pass, no update, the schedule moves on, the step
    is logged as skipped; the next batch trains (issue 14 item 9)."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    cfg = SFTConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), progress=False, tensorboard=False,
                    lr=1e-2, warmup_steps=0, schedule="linear")
    tr = Trainer(cfg, model, tok, recipe="sft", total_steps=4, log=lambda s: None)
    rows = ragged_rows(tok, 2)
    masked = pad_collate(rows, tok.pad_token_id)
    masked["targets"][:] = IGNORE
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = tr.optimizer_step(tr.accumulate([masked], sft_loss_fn(64), n_trained))
    assert m["skipped_steps"] == 1 and m["loss"] == 0.0 and m["grad_norm"] == 0.0 and m["lr"] == pytest.approx(1e-2)
    assert tr.step == 1 and tr.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 3 / 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    m = tr.optimizer_step(tr.accumulate([pad_collate(rows, tok.pad_token_id)], sft_loss_fn(64), n_trained))
    assert "skipped_steps" not in m and m["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grpo_run_where_every_step_is_empty_stops_with_one_line(tiny_model_dir, tmp_path):
    """truncated=mask with every sample cut: each step is skipped and logged; a run made only of
    such steps stops with one line naming the fix instead of saving an untrained model."""
    from alignkit.config import GRPOConfig
    from alignkit.errors import UserError
    from alignkit.recipes.grpo import train_grpo

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + {i}?"} for i in range(8)])
    out = tmp_path / "g"
    with pytest.raises(UserError, match="none of the 2 optimizer steps had anything to train on") as e:
        train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), max_steps=2,
                              batch_size=2, num_generations=2, max_new_tokens=1, truncated="mask", progress=False,
                              log_every=1),
                   reward_fn=lambda p, c, **k: [float(len(t)) + 0.1 * i for i, t in enumerate(c)])
    assert "\n" not in str(e.value)
    import json

    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["skipped_steps"], r["truncated_frac"]) for r in recs] == [(0.0, 1, 1.0)] * 2
    assert not (out / "model.safetensors").exists()


def test_epoch_remainder_is_stated_in_the_log(tiny_model_dir, tmp_path):
    """10 rows, global batch 4: the 2 rows each epoch leaves out are stated (issue 14 item 10)."""
    from alignkit.recipes.sft import train_sft

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10))
    lines: list[str] = []
    import alignkit.training.trainer as T

    real_init = T.Trainer.__init__

    def init(self, *a, **k):
        k["log"] = lines.append
        real_init(self, *a, **k)

    try:
        T.Trainer.__init__ = init
        train_sft(SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "s"), batch_size=4,
                            epochs=1, progress=False, tensorboard=False, plot=False))
    finally:
        T.Trainer.__init__ = real_init
    assert any("2 steps of 4 rows per epoch; 2 of the 10 rows are left out of each epoch" in ln for ln in lines), lines


def test_bf16_autocast_trains_sft_and_dpo_end_to_end(tiny_model_dir, tmp_path, no_curve_plots):
    """dtype=bfloat16 (autocast over float32 master weights, what dtype=auto picks on a GPU) through
    SFT and DPO, here on the CPU: the head's hand-written backward runs outside autocast (see
    test_ops' autocast test). Losses are finite and fall; the first SFT loss is the float32 one
    within bf16 rounding."""
    import json

    from alignkit.config import DPOConfig, load_config
    from alignkit.recipes.dpo import train_dpo
    from alignkit.recipes.sft import train_sft

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Хлеб: {i}", "chosen": f"Итого: {i} рублей.",
                                                "rejected": "The quick brown fox."} for i in range(8)])
    quiet = ["progress=false", "tensorboard=false", "log_every=1", "batch_size=4", "schedule=constant"]

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(x).get("kind") == "train"]

    for dtype in ("bfloat16", "float32"):
        train_sft(load_config(SFTConfig, None, [f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / dtype}",
                                                "max_steps=6", "lr=3e-3", f"dtype={dtype}", *quiet]))
    bf, fp = losses(tmp_path / "bfloat16"), losses(tmp_path / "float32")
    assert all(x == x for x in bf) and bf[-1] < bf[0] and abs(bf[0] - fp[0]) / fp[0] < 2e-2, (bf, fp)
    train_dpo(load_config(DPOConfig, None, [f"model={tiny_model_dir}", f"data={pairs}", f"output_dir={tmp_path / 'dpo'}",
                                            "max_steps=6", "lr=3e-3", "dtype=bfloat16", *quiet]))
    d = losses(tmp_path / "dpo")
    assert all(x == x for x in d) and d[-1] < d[0], d
