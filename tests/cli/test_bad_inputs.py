"""The bad-input catalogue: every mistake a user can make in a file, a folder or a config value
is answered with one line on stderr, exit code 2, no traceback, and nothing written.

Each row of CASES builds its inputs in tmp_path and runs the CLI in this process (`main`), so a
traceback would surface as an exception here. After each case the output folder must be absent
and every file the case started with unchanged."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.cli import main

from conftest import chat_rows, write_jsonl

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def snapshot(root: Path) -> dict:
    """Every file under root: (size, mtime_ns, mode)."""
    out = {}
    for p in root.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode) if p.is_file() else "dir"
    return out


class Fx:
    """Inputs for one case: a model folder, good data, and helpers to write bad files."""

    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model = tmp, model
        self.out = tmp / "out"
        self.data = write_jsonl(tmp / "train.jsonl", chat_rows(8))
        self.prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Хлеб: {i}", "total": i} for i in range(8)])

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return p

    def sft(self, *extra, data=None, model=None, out=None) -> list[str]:
        return ["sft", f"model={model or self.model}", f"data={data or self.data}", f"output_dir={out or self.out}",
                "progress=false", *extra]

    def grpo(self, *extra) -> list[str]:
        return ["grpo", f"model={self.model}", f"data={self.prompts}", f"output_dir={self.out}", "progress=false",
                "max_steps=1", "batch_size=2", "num_generations=2", *extra]


def _nonutf8(fx: Fx) -> list[str]:
    good = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in chat_rows(4)]
    bad = json.dumps(chat_rows(1)[0], ensure_ascii=False).encode()
    bad = bad.replace("Итого".encode(), "Итого".encode("cp1251"))
    return fx.sft(data=fx.file("cp1251.jsonl", b"".join(good[:2]) + bad + b"\n" + b"".join(good[2:])))


def _badjson(fx: Fx) -> list[str]:
    lines = [json.dumps(r, ensure_ascii=False) for r in chat_rows(9)]
    lines[6] = lines[6][:-1] + ', "total":,}'
    return fx.sft(data=fx.file("bad.jsonl", "\n".join(lines) + "\n"))


def _badjson_doc(fx: Fx) -> list[str]:
    rows = ",\n".join(json.dumps(r, ensure_ascii=False) for r in chat_rows(4))
    return fx.sft(data=fx.file("bad.json", "[\n" + rows + ",\n]\n"))


def _not_objects(fx: Fx) -> list[str]:
    return fx.sft(data=fx.file("rows.jsonl", '{"text": "a b c"}\n{"text": "d e f"}\n["text", 7]\n'))


def _badcsv(fx: Fx) -> list[str]:
    return fx.sft(data=fx.file("bad.csv", 'prompt,completion\n"unterminated,x\n1,2,3,4\n'))


def _csv_fields(fx: Fx) -> list[str]:
    return fx.sft(data=fx.file("fields.csv", "prompt,completion\na,b\nc,d\ne,f,g\n"))


def _template(fx: Fx) -> list[str]:
    return fx.sft(f"chat_template={fx.file('tpl.jinja', '{% for m in messages %}{{ m.content }{% endfor %}')}")


def _template_missing(fx: Fx) -> list[str]:
    return fx.sft(f"chat_template={fx.tmp / 'nope.jinja'}")


def _out_is_file(fx: Fx) -> list[str]:
    return fx.sft(out=fx.file("out_file", "not a folder\n"))


def _out_under_file(fx: Fx) -> list[str]:
    return fx.sft(out=fx.file("plain.txt", "x\n") / "run")


def _out_readonly(fx: Fx) -> list[str]:
    ro = fx.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return fx.sft(out=ro / "run")


def _out_readonly_fs(fx: Fx) -> list[str]:
    return fx.sft(out="/sys/alignkit-bad-input-test/run")


def _model_unreadable(fx: Fx) -> list[str]:
    m = fx.tmp / "broken_model"
    shutil.copytree(fx.model, m)
    (m / "config.json").write_text('{"model_type": "llama", ', encoding="utf-8")
    return fx.sft(model=m)


def _model_weights_corrupt(fx: Fx) -> list[str]:
    m = fx.tmp / "corrupt_model"
    shutil.copytree(fx.model, m)
    (m / "model.safetensors").write_bytes(b"\x00" * 64)
    return fx.sft(model=m)


def _model_no_permission(fx: Fx) -> list[str]:
    m = fx.tmp / "locked_model"
    shutil.copytree(fx.model, m)
    m.chmod(0)
    return fx.sft(model=m)


def _model_missing(fx: Fx) -> list[str]:
    return fx.sft(model=fx.tmp / "no" / "such_model")


def _model_missing_relative(fx: Fx) -> list[str]:
    return fx.sft(model="runs/no_such_model_here")


def _model_no_tokenizer(fx: Fx) -> list[str]:
    m = fx.tmp / "weights_only"
    m.mkdir()
    for f in fx.model.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, m / f.name)
    return fx.sft(model=m)


def _out_holds_a_run(fx: Fx) -> list[str]:
    fx.file("out/config.json", '{"model_type": "llama"}')
    fx.file("out/metrics.jsonl", '{"step": 1, "kind": "train", "loss": 1.0}\n')
    return fx.sft()


def _eval_out_file(fx: Fx) -> list[str]:
    return ["eval", f"model={fx.model}", f"prompts={fx.prompts}", f"output_dir={fx.file('eval_out', 'x')}"]


def _inspect_offset(fx: Fx) -> list[str]:
    return ["data", "inspect", str(fx.data), f"model={fx.model}", "offset=8"]


def _reward_empty(fx: Fx) -> list[str]:
    (fx.tmp / "empty_rm").mkdir()
    return fx.grpo(f"reward={fx.tmp / 'empty_rm'}")


def _reward_causal_lm(fx: Fx) -> list[str]:
    return fx.grpo(f"reward={fx.model}")


def _too_few_rows(fx: Fx) -> list[str]:
    return fx.sft("batch_size=16")


CASES = [
    # (id, argv builder, text the one error line must contain)
    ("non-utf8-data", _nonutf8, "line 3: byte"),
    ("json-line-7", _badjson, "line 7, column"),
    ("json-document", _badjson_doc, "line 6, column 1"),
    ("jsonl-row-not-an-object", _not_objects, "rows.jsonl: line 3: expected one JSON object per row"),
    ("csv-unterminated-quote", _badcsv, "bad.csv: line 2: bad CSV"),
    ("csv-field-count", _csv_fields, "fields.csv: line 4: 3 fields, but the header has 2"),
    ("config-yaml-not-utf8",
     lambda fx: [*fx.sft()[:1], str(fx.file("run.yaml", "lr: 1e-5\n# Итого\n".encode("cp1251"))), *fx.sft()[1:]],
     "run.yaml: line 2: byte 11 is not UTF-8"),
    ("config-yaml-syntax", lambda fx: [*fx.sft()[:1], str(fx.file("bad.yaml", "lr: [1e-5\n")), *fx.sft()[1:]],
     "is not valid YAML"),
    ("template-jinja-syntax", _template, "tpl.jinja: line 1: Jinja syntax error"),
    ("inspect-template-jinja-syntax",
     lambda fx: [*_inspect_offset(fx)[:4], f"chat_template={fx.file('t.jinja', '{{ x }')}"],
     "t.jinja: line 1: Jinja syntax error"),
    ("template-missing-file", _template_missing, "neither a Jinja template nor an existing file"),
    ("output-dir-is-a-file", _out_is_file, "output_dir is a file, not a folder"),
    ("output-dir-under-a-file", _out_under_file, "which is a file, not a folder"),
    ("output-dir-holds-a-run", _out_holds_a_run, "output_dir already holds a run"),
    ("output-dir-read-only", _out_readonly, "output_dir cannot be written"),
    ("output-dir-read-only-fs", _out_readonly_fs, "output_dir cannot be written"),
    ("model-config-unreadable", _model_unreadable, "config.json: not valid JSON"),
    ("model-weights-corrupt", _model_weights_corrupt, "could not load a causal language model"),
    ("model-folder-no-permission", _model_no_permission, "permission denied"),
    ("model-folder-missing", _model_missing, "model folder does not exist"),
    ("model-missing-offline", _model_missing_relative, "HF_HUB_OFFLINE is set"),
    ("data-hub-id-offline", lambda fx: fx.sft(data="someone/no_such_dataset"), "HF_DATASETS_OFFLINE is set"),
    ("model-without-tokenizer", _model_no_tokenizer, "the folder has no tokenizer"),
    ("ref-model-folder-missing", lambda fx: fx.grpo("kl_coef=0.1", f"ref_model={fx.tmp / 'no' / 'ref'}"),
     "reference model folder does not exist"),
    ("toy-data-output-under-a-file", lambda fx: ["toy", "data", f"output={fx.file('f.txt', 'x') / 'rows.jsonl'}",
                                                 "n=3"], "output lies under"),
    ("toy-data-output-is-a-folder", lambda fx: ["toy", "data", f"output={fx.tmp}", "n=3"], "output is a folder"),
    ("eval-output-dir-is-a-file", _eval_out_file, "output_dir is a file, not a folder"),
    ("inspect-offset-past-end", _inspect_offset, "offset=8 is past the end (8 rows)"),
    ("reward-empty-folder", _reward_empty, "the folder is empty"),
    ("reward-causal-lm", _reward_causal_lm, "a causal language model (LlamaForCausalLM), not a reward model"),
    ("rows-fewer-than-a-batch", _too_few_rows, "fewer than one global batch of 16"),
    ("max-steps-0", lambda fx: fx.sft("max_steps=0"), "bad value for 'max_steps'"),
    ("max-steps-negative", lambda fx: fx.sft("max_steps=-3"), "bad value for 'max_steps'"),
    ("epochs-negative", lambda fx: fx.sft("epochs=-3"), "bad value for 'epochs'"),
    ("max-grad-norm-negative", lambda fx: fx.sft("max_grad_norm=-1"), "bad value for 'max_grad_norm'"),
    ("adam-beta-one", lambda fx: fx.sft("adam_betas=[0.9, 1.0]"), "each AdamW beta must be in [0, 1)"),
    ("dpo-prompt-fills-max-length", lambda fx: ["dpo", f"model={fx.model}", f"data={fx.data}", "max_length=64",
                                                "max_prompt_length=64", f"output_dir={fx.out}"],
     "leaves no room for the answer"),
    ("grpo-one-generation", lambda fx: fx.grpo("num_generations=1"), "bad value for 'num_generations'"),
    ("rloo-one-generation", lambda fx: ["rloo", f"model={fx.model}", f"data={fx.prompts}", "num_generations=1",
                                        f"output_dir={fx.out}"], "bad value for 'num_generations'"),
    ("grpo-greedy", lambda fx: fx.grpo("temperature=0"), "temperature=0 (greedy) makes all 2 samples"),
    ("reinforce-greedy", lambda fx: ["reinforce", f"model={fx.model}", f"data={fx.prompts}", "temperature=0",
                                     f"output_dir={fx.out}"], "samples are not draws from the policy"),
    ("eval-greedy-several-samples", lambda fx: ["eval", f"model={fx.model}", f"prompts={fx.prompts}",
                                                "temperature=0", "n_samples=4", f"output_dir={fx.out}"],
     "makes all 4 samples of a prompt the same"),
    ("eval-no-prompts", lambda fx: ["eval", f"model={fx.model}", f"prompts={fx.prompts}", "max_prompts=0",
                                    f"output_dir={fx.out}"], "bad value for 'max_prompts'"),
]


def _skip_reason(case_id: str) -> str | None:
    if case_id in ("output-dir-read-only", "model-folder-no-permission") and IS_ROOT:
        return "root ignores file permissions (the read-only file-system row covers the probe)"
    if case_id == "output-dir-read-only-fs":
        try:
            os.mkdir("/sys/alignkit-bad-input-test")
        except OSError:
            return None
        os.rmdir("/sys/alignkit-bad-input-test")
        return "/sys is writable here"
    return None


@pytest.mark.parametrize("make_args, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(request, tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                   make_args, needle):
    reason = _skip_reason(request.node.callspec.id)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fx = Fx(tmp_path, tiny_model_dir)
    argv = make_args(fx)
    out_existed = fx.out.exists()
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        for p in tmp_path.rglob("*"):  # give back what a case locked, so tmp_path can be cleaned
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("alignkit: error:"), err
    assert needle in err[0], err[0]
    assert "Traceback" not in err[0]
    assert fx.out.exists() == out_existed
    assert snapshot(tmp_path) == before, "the case wrote or changed files"


def test_hub_id_without_network_fails_at_once(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """No HF_HUB_OFFLINE, but no route to the hub: one line at once, not a minute of retries."""
    from alignkit.models import load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(load, "_in_hub_cache", lambda repo: False)
    monkeypatch.setattr(load, "_hub_reachable", lambda timeout=3.0: False)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    t0 = time.time()
    code = main(["sft", "model=someone/some-model", f"data={data}", f"output_dir={tmp_path / 'out'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    assert "the hub cannot be reached (no network)" in err[0] and "model=PATH" in err[0]
    assert time.time() - t0 < 5 and not (tmp_path / "out").exists()


def test_hub_reachability_probe_is_bounded(monkeypatch):
    """The probe asks the endpoint for a TCP connection with a short timeout (a closed local
    port answers at once)."""
    from huggingface_hub import constants

    from alignkit.models import load

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t0 = time.time()
    assert load._hub_reachable(timeout=1.0) is False
    assert time.time() - t0 < 3


def test_every_chosen_equal_to_rejected_warns_once(tiny_model_dir, tmp_path, capsys):
    from alignkit.data.preference import load_pairs
    from alignkit.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    same = [{"prompt": f"Хлеб: {i}", "chosen": f"Итого: {i}", "rejected": f"Итого: {i}"}
            for i in range(4)]
    load_pairs(str(write_jsonl(tmp_path / "same.jsonl", same)), "train", tok, 64)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("alignkit: warning:")
    assert "every 'chosen' equals its 'rejected'" in err[0]
    mixed = same[:3] + [{"prompt": "Хлеб: 9", "chosen": "Итого: 9", "rejected": "Итого: 8"}]
    load_pairs(str(write_jsonl(tmp_path / "mixed.jsonl", mixed)), "train", tok, 64)
    assert capsys.readouterr().err.strip() == ""


def test_toy_files_respect_the_umask(tmp_path):
    from alignkit.toy.model import _atomic_copytree
    from alignkit.toy.world import write_jsonl as toy_write

    old = os.umask(0o022)
    try:
        f = toy_write([{"a": 1}], tmp_path / "rows.jsonl")
        src = tmp_path / "src"
        src.mkdir()
        (src / "w.bin").write_bytes(b"x")
        _atomic_copytree(src, tmp_path / "copy")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o755


# --------------------------------------------------------------------------- remote code


CUSTOM_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "alignkit_evil"
'''


def _custom_code_folder(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    d = tmp_path / "custom_code_model"
    shutil.copytree(model, d)
    marker = tmp_path / "CODE_RAN"
    (d / "configuration_evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)), encoding="utf-8")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "alignkit_evil"
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    tc = d / "tokenizer_config.json"
    t = json.loads(tc.read_text())
    t["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tc.write_text(json.dumps(t))
    (d / "tokenization_evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)), encoding="utf-8")
    return d, marker


def test_custom_code_in_a_model_folder_never_runs_even_with_y_on_stdin(tiny_model_dir, tmp_path):
    d, marker = _custom_code_folder(tmp_path, tiny_model_dir)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "alignkit", "sft", f"model={d}", f"data={data}",
                          f"output_dir={tmp_path / 'out'}", "progress=false"], input="y\ny\ny\n", text=True,
                         capture_output=True, env=env, timeout=300)
    assert not marker.exists(), "the folder's Python code was executed"
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
    assert "ships its own Python code" in err[0] and "trust_remote_code=true" in err[0]
    assert not (tmp_path / "out").exists()


def test_loaders_pass_trust_remote_code_false_and_use_safetensors(tiny_model_dir, monkeypatch):
    """Every transformers loader gets trust_remote_code explicitly (False unless opted in), and
    weights come from safetensors where the folder has them."""
    import transformers

    from alignkit.models import load

    seen = []
    real_tok, real_lm = transformers.AutoTokenizer.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: (seen.append(("tok", k)), real_tok(*a, **k))[1])
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (seen.append(("lm", k)), real_lm(*a, **k))[1])
    load.load_tokenizer(str(tiny_model_dir))
    load.load_model(str(tiny_model_dir))
    with load.allow_remote_code(True):
        load.load_tokenizer(str(tiny_model_dir))
    assert [(w, k["trust_remote_code"]) for w, k in seen] == [("tok", False), ("lm", False), ("tok", True)]
    assert seen[1][1]["use_safetensors"] is True


def test_non_utf8_names_the_exact_byte(tmp_path):
    from alignkit.data.loading import load_rows
    from alignkit.errors import UserError

    head = '{"text": "привет"}\n{"text": "ok"}\n'.encode()
    line3 = '{"text": "Итого: '.encode() + "рублей".encode("cp1251") + b'"}\n'
    p = tmp_path / "d.jsonl"
    p.write_bytes(head + line3)
    col = line3.index("рублей".encode("cp1251"))
    with pytest.raises(UserError) as e:
        load_rows(str(p))
    want = f"line 3: byte {len(head) + col} of the file (byte {col + 1} of the line: f0 f3 e1 eb) is not UTF-8"
    assert want in str(e.value)
    p.write_bytes(b"\xef\xbb\xbf" + head)  # a UTF-8 BOM is fine
    assert load_rows(str(p))["text"] == ["привет", "ok"]
