"""Run folders and resume: no unpickling on resume, one run per folder, overwrite starts clean,
changed settings on resume, metrics after a kill, and the NaN stop keeping a usable state."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.cli import main as cli_main
from alignkit.config import SFTConfig
from alignkit.data.collate import n_trained, pad_collate
from alignkit.errors import UserError
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes.sft import sft_loss_fn
from alignkit.training import checkpoint as ckpt
from alignkit.training.trainer import Trainer, TrainingDiverged

from conftest import ROOT, chat_rows, write_jsonl

QUIET = ["progress=false", "tensorboard=false", "plot=false", "log_every=1", "logits_chunk_size=64"]
MARKER_NAME = "payload-ran"


class Payload:
    """Unpickling this creates a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("runs_data") / "d.jsonl", chat_rows(8))


def sft(model_dir, data, out, *extra) -> list[str]:
    return ["sft", f"model={model_dir}", f"data={data}", f"output_dir={out}", "batch_size=2", "lr=3e-3",
            "warmup_steps=1", *QUIET, *extra]


def run(capsys, args) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(args)
    return rc, capsys.readouterr().err


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    errs = [ln for ln in lines if ln.startswith("alignkit: error:")]
    assert len(errs) == 1 and lines[-1] == errs[0] and "Traceback" not in stderr, stderr
    return errs[0]


def train_steps(out: Path) -> list[int]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if r["kind"] == "train"]


def steps_of(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))


def make_trainer(model_dir, out, **kw) -> Trainer:
    tok = load_tokenizer(str(model_dir))
    cfg = SFTConfig(model=str(model_dir), output_dir=str(out), progress=False, tensorboard=False, plot=False, **kw)
    return Trainer(cfg, load_model(str(model_dir)), tok, recipe="sft", total_steps=kw.get("max_steps", 6),
                   log=lambda s: None)


def one_step(tr: Trainer, rows) -> dict:
    mb = pad_collate(rows, tr.tokenizer.pad_token_id)
    return tr.optimizer_step(tr.accumulate([mb], sft_loss_fn(64), n_trained))


def encoded_rows(model_dir, n=2):
    from alignkit.data.chat import encode_messages

    tok = load_tokenizer(str(model_dir))
    return [encode_messages(tok, r["messages"]) for r in chat_rows(n)]


# ------------------------------------------------------------------------ 11. resume never unpickles


def test_training_state_is_json_and_safetensors_and_round_trips_bit_for_bit(tiny_model_dir, tmp_path):
    """Optimizer, schedule, RNG streams (python, numpy, torch) and a recipe's registered state
    (tensors, numpy arrays and scalars, tuples, int keys) come back exactly; no pickle is written."""
    rows = encoded_rows(tiny_model_dir)
    a = make_trainer(tiny_model_dir, tmp_path / "a", max_steps=6)
    a.prepare_run_dir()
    extra = {"value": 0.1 + 0.2, "count": 2**40 + 1, "t": torch.randn(3, dtype=torch.float64),
             "ids": {3: torch.arange(4), 7: (1, 2.5, None)}, "arr": np.arange(5, dtype=np.uint32),
             "np_scalar": np.float32(1.25), "bf": torch.randn(2, 2).to(torch.bfloat16), "nan": float("nan")}
    got = {}
    a.register_state("recipe", lambda: extra, got.update)
    for _ in range(2):
        one_step(a, rows)
    random.random(), np.random.rand(), torch.rand(1)  # move every stream off its seed
    path = a.save_checkpoint()
    want_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    names = sorted(p.name for p in path.iterdir())
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))], names
    assert {"trainer_state.json", "trainer_state.safetensors", "rng-0.json", "rng-0.safetensors"} <= set(names)
    assert json.loads((path / "trainer_state.json").read_text())["state"]["step"] == 2

    seed_all = 123
    random.seed(seed_all), np.random.seed(seed_all), torch.manual_seed(seed_all)
    b = make_trainer(tiny_model_dir, tmp_path / "a", max_steps=6, resume=True)
    b.register_state("recipe", lambda: {}, got.update)
    assert b.prepare_run_dir() == path
    b.load_checkpoint(path)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want_draws
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert a.scheduler.state_dict() == b.scheduler.state_dict() and b.step == 2
    assert got["value"] == 0.1 + 0.2 and got["count"] == 2**40 + 1 and torch.equal(got["t"], extra["t"])
    assert torch.equal(got["ids"][3], torch.arange(4)) and got["ids"][7] == (1, 2.5, None)
    assert got["arr"].dtype == np.uint32 and (got["arr"] == extra["arr"]).all()
    assert type(got["np_scalar"]) is np.float32 and got["np_scalar"] == 1.25
    assert got["bf"].dtype == torch.bfloat16 and torch.equal(got["bf"], extra["bf"]) and got["nan"] != got["nan"]
    # Both trainers take the same next step.
    ma, mb = one_step(a, rows), one_step(b, rows)
    assert ma["loss"] == mb["loss"]
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    a.close(), b.close()


def test_pickle_planted_in_a_checkpoint_never_runs(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=2"))
    assert rc == 0, err
    ck = out / "checkpoints" / "step-0000002"
    marker = tmp_path / MARKER_NAME

    # A pickle next to a good state (the RNG file of the old format): never opened.
    torch.save({"python": Payload(marker)}, ck / "rng-0.pt")
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=3", "resume=true"))
    assert rc == 0 and "resumed from" in err, err
    assert not marker.exists()

    # A checkpoint whose state is a pickle (old format or crafted): refused in one line.
    ck3 = out / "checkpoints" / "step-0000003"
    for f in ck3.glob("trainer_state.*"):
        f.unlink()
    torch.save({"step": Payload(marker)}, ck3 / "trainer_state.pt")
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=4", "resume=true"))
    line = error_line(err)
    assert rc == 2 and "pickle" in line and "step-0000003" in line, line
    assert not marker.exists()


def test_sharded_checkpoint_payloads_are_refused(tmp_path):
    """FSDP checkpoints (torch.distributed.checkpoint) hold a pickled metadata file and pickled
    byte items; both are read without running code."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from alignkit.training.fsdp import load_sharded, save_sharded

    warnings.filterwarnings("ignore", message=".*(single process|no_dist|torch.distributed).*")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    good = tmp_path / "step-0000001" / "sharded"
    save_sharded(model, opt, good)
    # the safe reader loads what save_sharded wrote, exactly
    m2, o2 = torch.nn.Linear(3, 2), None
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    m2(torch.ones(1, 3)).sum().backward()
    o2.step()
    load_sharded(m2, o2, good)
    assert torch.equal(m2.weight, model.weight)
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    marker = tmp_path / MARKER_NAME
    bad = tmp_path / "step-0000002" / "sharded"
    shutil.copytree(good, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserError, match="refused to load .metadata"):
        load_sharded(m2, o2, bad)
    assert not marker.exists()

    # a byte item (non-tensor value) that is a payload
    items = tmp_path / "step-0000003" / "sharded"
    dcp.save({"x": Payload(marker), "w": torch.ones(2)}, checkpoint_id=str(items))
    with pytest.raises(UserError, match="refused to load item x"):
        ckpt.safe_dcp_load({"x": None, "w": torch.zeros(2)}, items, no_dist=True)
    assert not marker.exists()


# ------------------------------------------------------------------------ 13. one run per folder

HOLD = """
import sys, time
from pathlib import Path
from alignkit.training.checkpoint import RunLock
d = Path(sys.argv[1])
d.mkdir(parents=True, exist_ok=True)
RunLock(d).acquire()
stage = d / "checkpoints" / ".step-0000002.tmp-live"
stage.mkdir(parents=True)
(stage / "half-written").write_text("x")
print("holding", flush=True)
time.sleep(120)
"""


def test_second_run_on_a_busy_folder_is_refused_and_stale_locks_are_taken_over(tiny_model_dir, data, tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    try:
        assert holder.stdout.readline().strip() == "holding"
        rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=1", "overwrite=true", "tensorboard=true"))
        line = error_line(err)
        assert rc == 2 and "in use by another run" in line and f"PID {holder.pid}" in line, line
        # the live run's staging folder was not touched, nothing was written
        assert (out / "checkpoints" / ".step-0000002.tmp-live" / "half-written").exists()
        assert sorted(p.name for p in out.iterdir()) == [".alignkit.lock", "checkpoints"]
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale, the next run takes over and cleans up.
    assert str(holder.pid) in (out / ".alignkit.lock").read_text()
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=1"))
    assert rc == 0, err
    assert f"(PID {holder.pid})" in err and "taking over the lock" in err
    assert not (out / "checkpoints" / ".step-0000002.tmp-live").exists()
    assert not (out / ".alignkit.lock").exists()  # released at the end of the run


def test_lock_without_flock_uses_the_pid(tmp_path, monkeypatch):
    """Where flock is unavailable (some network filesystems) the PID in the file decides."""
    monkeypatch.setattr(ckpt, "_try_flock", lambda fd: None)
    d = tmp_path / "r"
    d.mkdir()
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (d / ckpt.LOCK_FILE).write_text(f"{dead} {socket.gethostname()} x")
    lock = ckpt.RunLock(d)
    lock.acquire()  # a dead PID: stale
    assert lock.previous.startswith(dead)
    lock.release()
    (d / ckpt.LOCK_FILE).write_text(f"{os.getppid()} {socket.gethostname()} x")  # a live one
    with pytest.raises(UserError, match=f"in use by another run \\(PID {os.getppid()}"):
        ckpt.RunLock(d).acquire()


def test_staging_names_are_unique_per_process(tiny_model_dir, tmp_path, monkeypatch):
    tr = make_trainer(tiny_model_dir, tmp_path / "r", max_steps=2)
    tr.prepare_run_dir()
    seen = []
    real = ckpt.atomic_dir_write
    monkeypatch.setattr(ckpt, "atomic_dir_write", lambda final, w: seen.append(
        sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())) or real(final, w))
    tr.save_checkpoint()
    assert seen == [[f".rng-step-0000000-{os.getpid()}"]]
    tr.close()


# ------------------------------------------------------------------------ 14. overwrite starts clean


def test_overwrite_removes_the_earlier_run(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=6", "save_every=2", "save_total_limit=5",
                              "tensorboard=true"))
    assert rc == 0 and steps_of(out) == [2, 4, 6], err
    (out / "samples.txt").write_text("old")
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=2", "save_every=1", "save_total_limit=1",
                              "overwrite=true", "tensorboard=true"))
    assert rc == 0, err
    assert "overwrite=true: removed the earlier run" in err
    assert steps_of(out) == [2]  # not the old run's 4 and 6
    assert train_steps(out) == [1, 2]
    assert not (out / "samples.txt").exists()
    if importlib.util.find_spec("tensorboard") is not None:  # an optional extra
        assert len(list((out / "tensorboard").iterdir())) == 1  # this run's events only
    # and resume=true continues the new run, not the old one
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=3", "resume=true"))
    assert rc == 0 and "checkpoints/step-0000002 at step 2" in err, err
    assert train_steps(out) == [1, 2, 3]
    # overwrite never removes what the new run reads
    ck = out / "checkpoints" / "step-0000003"
    rc, err = run(capsys, ["sft", f"model={ck}", *sft(tiny_model_dir, data, out, "max_steps=1", "overwrite=true")[2:]])
    line = error_line(err)
    assert rc == 2 and "lies inside output_dir" in line and (ck / "model.safetensors").exists(), line


# ------------------------------------------------------------------------ 15. changed settings on resume


def test_changed_settings_on_resume(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=2"))
    assert rc == 0, err
    saved = (out / "config.yaml").read_text()
    for change, needle in ((["lr=1e-2"], "lr: 0.003 -> 0.01"), (["seed=5"], "seed: 0 -> 5"),
                           (["schedule=linear"], "schedule: 'cosine' -> 'linear'"),
                           (["batch_size=4"], "global batch"), (["grad_accum=2"], "global batch"),
                           ([f"data={tmp_path / 'other.jsonl'}"], "data:")):
        shutil.copy(data, tmp_path / "other.jsonl")
        rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=4", "resume=true") + change)
        line = error_line(err)
        assert rc == 2 and needle in line and "change the run's arithmetic" in line, line
        assert (out / "config.yaml").read_text() == saved  # nothing recorded that did not apply
        assert train_steps(out) == [1, 2]
    # Length, cadence and logging may change: applied and said.
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=4", "save_every=1", "log_every=2",
                              "resume=true"))
    assert rc == 0, err
    assert "applying changed settings" in err and "max_steps: 2 -> 4" in err and "save_every: 0 -> 1" in err
    assert steps_of(out)[-2:] == [3, 4] and train_steps(out) == [1, 2, 4]
    assert "max_steps: 4" in (out / "config.yaml").read_text()


# ------------------------------------------------------------------------ 16. metrics after a kill


def test_resume_after_a_kill_before_the_first_checkpoint_has_no_duplicate_records(tiny_model_dir, data, tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=3"))
    assert rc == 0, err
    # What a kill at step 3, before any checkpoint, leaves: the log (a torn last line) and the config.
    shutil.rmtree(out / "checkpoints")
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "config.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=3", "resume=true"))
    assert rc == 0, err
    assert train_steps(out) == [1, 2, 3]

    # A kill after a checkpoint: records past it are dropped on resume, in TensorBoard too.
    b = tmp_path / "b"
    rc, err = run(capsys, sft(tiny_model_dir, data, b, "max_steps=4", "save_every=2", "tensorboard=true"))
    shutil.rmtree(b / "checkpoints" / "step-0000004")
    time.sleep(1.1)  # TensorBoard orders event files by the second in their names
    rc, err = run(capsys, sft(tiny_model_dir, data, b, "max_steps=4", "save_every=2", "resume=true",
                              "tensorboard=true"))
    assert rc == 0 and train_steps(b) == [1, 2, 3, 4], err
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(b / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------ 17. the NaN stop


def test_nan_stop_after_blown_up_weights_names_the_last_sane_checkpoint(tiny_model_dir, tmp_path):
    """A step with a far too large lr throws the weights to |w| ~ 1e8: the loss stays finite for
    that step and is NaN at the next. The stop must not save (or point at) the blown-up state but
    the last checkpoint with sane weights, keep it through pruning, and resuming it with a lower
    lr trains on."""
    rows = encoded_rows(tiny_model_dir)
    out = tmp_path / "run"
    tr = make_trainer(tiny_model_dir, out, max_steps=8, lr=1e-3, schedule="constant", save_total_limit=1)
    tr.prepare_run_dir()
    for _ in range(2):
        one_step(tr, rows)
    tr.save_checkpoint()
    tr.scheduler.base_lrs = [1e8 for _ in tr.scheduler.base_lrs]  # the spike (a far too large lr)
    for g in tr.optimizer.param_groups:
        g["lr"] = 1e8
    with pytest.raises(TrainingDiverged) as e:
        for _ in range(5):
            m = one_step(tr, rows)
            tr.save_checkpoint()  # a checkpoint every step: the blown-up states get saved too
            assert m["loss"] == m["loss"]
    msg = str(e.value)
    assert "is nan" in msg and "blown up" in msg and "step-0000002" in msg and "lr" in msg, msg
    blown = steps_of(out)
    assert blown[0] == 2 and len(blown) >= 2  # pruning (save_total_limit=1) kept the sane one
    assert ckpt.is_sane(out / "checkpoints" / "step-0000002")
    assert not ckpt.is_sane(out / "checkpoints" / f"step-{blown[-1]:07d}")
    tr.close()

    # resume=true goes back to step 2; with the same lr it would only blow up again, so a lower lr
    # is accepted after a divergence, and training goes on with finite, sane weights.
    tr2 = make_trainer(tiny_model_dir, out, max_steps=5, lr=5e-4, schedule="constant", save_total_limit=1,
                       resume=True)
    path = tr2.prepare_run_dir()
    assert path == out / "checkpoints" / "step-0000002"
    tr2.load_checkpoint(path)
    assert tr2.optimizer.param_groups[0]["lr"] == 5e-4
    for _ in range(3):
        m = one_step(tr2, rows)
        assert np.isfinite(m["loss"])
    assert tr2._health()["sane"]
    tr2.close()


def test_nan_stop_with_sane_weights_saves_them(tiny_model_dir, tmp_path):
    rows = encoded_rows(tiny_model_dir)
    tr = make_trainer(tiny_model_dir, tmp_path / "run", max_steps=4)
    tr.prepare_run_dir()
    one_step(tr, rows)

    def nan_loss(m, b):
        loss, _ = sft_loss_fn(64)(m, b)
        return loss * float("nan"), {}

    mb = pad_collate(rows, tr.tokenizer.pad_token_id)
    with pytest.raises(TrainingDiverged, match="last good state saved at .*step-0000001"):
        tr.optimizer_step(tr.accumulate([mb], nan_loss, n_trained))
    assert ckpt.is_sane(tmp_path / "run" / "checkpoints" / "step-0000001")
    rec = json.loads((tmp_path / "run" / ckpt.DIVERGED_FILE).read_text())
    assert rec["step"] == 2 and rec["resume_from"].endswith("step-0000001")
    tr.close()


def test_blown_up_run_is_not_resumed_from_its_blown_up_state(tiny_model_dir, data, tmp_path, capsys):
    """lr=1e8 from the start: step 1 throws |w| to ~1e10, step 2 is NaN. Before, the stop saved
    step 1 as "the last good state" and resume=true failed again on it."""
    out = tmp_path / "run"
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "lr=1e8", "max_steps=6", "save_every=1"))
    line = error_line(err)
    assert rc == 3 and "blown up" in line and "no checkpoint holds sane weights" in line, line
    assert all(not ckpt.is_sane(p) for p in ckpt.list_checkpoints(out))
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "lr=1e-3", "max_steps=3", "resume=true"))
    assert rc == 0 and "starting from scratch" in err, err
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] < 10 for r in recs if r["kind"] == "train")


def test_unwritable_output_dir_is_one_line(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    """A read-only output_dir (simulated: the tests may run as root, who writes anyway)."""
    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt.RunLock, "acquire", denied)
    out = tmp_path / "ro"
    rc, err = run(capsys, sft(tiny_model_dir, data, out, "max_steps=1"))
    line = error_line(err)
    assert rc == 2 and "cannot write into output_dir (Permission denied)" in line, line
    assert not out.exists()  # the folder this run created is removed again
