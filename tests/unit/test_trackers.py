"""report_to: every tracker gets the same metrics, the run config and the final samples through its
own client library, in its offline mode (W&B offline, an MLflow file store, trackio's local store),
and the values are read back. A tracker whose client is not installed is skipped."""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path

import pytest

from alignkit.config import SFTConfig, load_config
from alignkit.errors import UserError
from alignkit.training.logging import MetricsLog, resolve_report_to

CONFIG = {"lr": 0.001, "peft": {"r": 8}, "model": "tiny"}
TRAIN = [(1, {"loss": 2.0, "reward_mean": 0.25}), (2, {"loss": 1.5, "reward_mean": 0.5})]
EVAL = (2, {"eval_solved": 0.75})
SAMPLES = [{"step": 1, "prompt": "old", "completion": "x", "reward": 0.0},
           {"step": 2, "prompt": "Хлеб: 55", "completion": "Итого: 55 рублей.", "reward": 1.0}]


def _log_run(run_dir: Path, kind: str) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SAMPLES))
    m = MetricsLog(run_dir, report_to=[kind], config=CONFIG, name="sft:test")
    assert list(m.trackers) == [kind]
    for step, metrics in TRAIN:
        m.write(step, metrics)
    m.write(EVAL[0], EVAL[1], kind="eval")
    m.close()
    # metrics.jsonl holds the same records whatever the trackers
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if r["kind"] == "train"] == [2.0, 1.5]


def test_report_to_parsing_and_errors():
    cfg = load_config(SFTConfig, None, ["report_to=tensorboard,none"]) if _has("tensorboard") else None
    if cfg is not None:
        assert cfg.report_to == ["tensorboard"]
    assert load_config(SFTConfig, None, ["report_to=none"]).report_to == []
    assert load_config(SFTConfig, None, ["report_to=[]"]).report_to == []
    assert load_config(SFTConfig, None, []).report_to == ["auto"]
    with pytest.raises(UserError, match="unknown tracker 'wandbb'"):
        load_config(SFTConfig, None, ["report_to=wandbb"])
    assert resolve_report_to(["auto"], tensorboard=False) == []
    assert resolve_report_to([]) == []
    assert resolve_report_to(None) == (["tensorboard"] if _has("tensorboard") else [])


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def test_tensorboard_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(tmp_path / "run", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0), (2, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/eval_solved")] == [(2, 0.75)]
    text = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    assert any("Итого: 55 рублей." in v for v in text.values()) and any('"lr": 0.001' in v for v in text.values())


def _wandb_records(path: str) -> list:
    """Records of an offline W&B run file (LevelDB-style log of protobuf records: 32 KiB blocks,
    each record with a 7-byte header of crc32, length, type; a 7-byte file header first)."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = Path(path).read_bytes()
    assert buf[:4] == b":W&B"
    pos, block, out, part = 7, 32768, [], b""
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, typ = struct.unpack("<IHB", buf[pos:pos + 7])
        data = buf[pos + 7:pos + 7 + n]
        pos += 7 + n
        if typ == 0:
            continue
        part = data if typ in (1, 2) else part + data  # 1 full, 2 first, 3 middle, 4 last
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


def test_wandb_offline_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_run(tmp_path / "run", "wandb")
    files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # wandb's service may still be writing the file when finish() returns
        records = _wandb_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    history, config = [], {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == [(1, 2.0), (2, 1.5)]
    assert [h["eval/eval_solved"] for h in history if "eval/eval_solved" in h] == [0.75]
    assert any(h.get("samples/nrows") == 1 for h in history)  # the last step's samples, as a table
    assert config["lr"] == {"value": 0.001} or config["lr"] == 0.001
    table = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json"))
    assert table and "Итого: 55 рублей." in json.loads(Path(table[0]).read_text())["data"][0]


def test_mlflow_file_store_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _log_run(tmp_path / "run", "mlflow")
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    rid = runs[0].info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "train/loss")] == [(1, 2.0), (2, 1.5)]
    assert [m.value for m in client.get_metric_history(rid, "eval/eval_solved")] == [0.75]
    assert runs[0].data.params["lr"] == "0.001" and runs[0].data.params["peft.r"] == "8"
    table = json.loads(Path(client.download_artifacts(rid, "samples.json", str(tmp_path / "dl"))).read_text())
    assert "Итого: 55 рублей." in json.dumps(table, ensure_ascii=False)


def test_trackio_local_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    import importlib
    import sys

    importlib.import_module("trackio.sqlite_storage")
    # trackio reads TRACKIO_DIR once, at import (possibly before this test): point every copy here
    for name, mod in list(sys.modules.items()):
        if name.startswith("trackio") and isinstance(getattr(mod, "TRACKIO_DIR", None), Path):
            monkeypatch.setattr(mod, "TRACKIO_DIR", tmp_path / "trackio")
    monkeypatch.setenv("TRACKIO_PROJECT", "alignkit-test")
    _log_run(tmp_path / "run", "trackio")
    storage = sys.modules["trackio.sqlite_storage"].SQLiteStorage
    assert list((tmp_path / "trackio").glob("alignkit-test.db"))
    assert storage.get_runs("alignkit-test") == ["sft:test"]
    logs = storage.get_logs("alignkit-test", "sft:test")
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == [(1, 2.0), (2, 1.5)]
    assert [r["eval/eval_solved"] for r in logs if "eval/eval_solved" in r] == [0.75]
    samples = [r["samples"] for r in logs if "samples" in r]
    assert samples and "Итого: 55 рублей." in json.dumps(samples, ensure_ascii=False)
    assert storage.get_run_config("alignkit-test", "sft:test")["lr"] == 0.001


@pytest.mark.slow  # ~30 s on 2 busy cores: a subprocess importing torch, transformers and mlflow
def test_sft_run_logs_to_a_tracker_and_progress_lines_in_its_log(tiny_model_dir, tmp_path, monkeypatch):
    """A real run with report_to=mlflow: the tracker holds the losses of metrics.jsonl and the run
    config; the run's stderr (a file here, not a terminal) has plain progress lines, no control codes."""
    pytest.importorskip("mlflow")
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from conftest import chat_rows, write_jsonl

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "out"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_FILE_STORE="true", ALIGNKIT_PROGRESS_INTERVAL="0",
               OMP_NUM_THREADS="1")
    with open(tmp_path / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "alignkit", "sft", f"model={tiny_model_dir}", f"data={data}",
                             f"output_dir={out}", "max_steps=6", "batch_size=4", "log_every=1", "report_to=mlflow"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0, text[-2000:]
    assert "\r" not in text and "\x1b[" not in text  # no bar control codes in a log
    lines = [ln for ln in text.splitlines() if ln.startswith("sft:")]
    assert any("6/6" in ln for ln in lines) and any("step/s" in ln or "s/step" in ln for ln in lines), lines
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    client = MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert [s for s, _ in logged] == [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses])
    assert run.data.params["max_steps"] == "6" and run.info.run_name == "sft:out"
