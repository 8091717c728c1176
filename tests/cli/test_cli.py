"""The CLI as a user meets it: help, config files + overrides, SFT end to end, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignkit.cli import main
from alignkit.config import SFTConfig, load_config
from alignkit.errors import UserError

from conftest import chat_rows, write_jsonl

PY = sys.executable


def run_cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-m", "alignkit", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_help_lists_every_key_with_type_default_doc(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "data", "eval_data", "output_dir", "max_steps", "epochs", "batch_size", "grad_accum", "lr",
                "warmup_steps", "schedule", "max_length", "seed", "dtype", "resume", "packing"):
        assert f"  {key} " in out, key
    assert "cosine|linear|constant" in out and "default 2e-05" in out


def test_yaml_plus_dotted_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model: m\ndata: d.jsonl\nlr: 1e-4\nmax_steps: 5\n")
    cfg = load_config(SFTConfig, str(y), ["lr=3e-5", "packing=true", "resume=runs/x/checkpoints/step-1"])
    assert cfg.lr == 3e-5 and cfg.max_steps == 5 and cfg.packing is True
    assert cfg.resume == "runs/x/checkpoints/step-1"
    assert load_config(SFTConfig, None, ["resume=true"]).resume is True


def test_list_keys_take_a_comma_list(tmp_path):
    """`methods=grpo,gspo` is the list [grpo, gspo], the same as `methods=[grpo,gspo]` (it used to be
    refused as 'not a valid list'); one value is a one-item list."""
    from alignkit.demo import DemoConfig

    for raw in ("grpo,gspo", "[grpo,gspo]"):
        assert load_config(DemoConfig, None, [f"methods={raw}"]).methods == ["grpo", "gspo"]
    assert load_config(DemoConfig, None, ["methods=rs"]).methods == ["rs"]
    assert load_config(DemoConfig, None, ["seeds=0,1,2"]).seeds == [0, 1, 2]


@pytest.mark.parametrize("raw, want", [
    ("all-linear", "all-linear"),  # peft's keyword, a string (as a one-item list peft found no module)
    ("q_proj", ["q_proj"]),  # one module-name suffix
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("[q_proj]", ["q_proj"]),
    (".*\\.(q|v)_proj", ".*\\.(q|v)_proj"),  # a regex stays a regex
])
def test_target_modules_one_value_keeps_its_meaning(raw, want):
    """A key that takes a string or a list keeps one word as the string it is: the comma-list
    reading made `peft.target_modules=all-linear` the list ['all-linear'], which peft refused."""
    assert load_config(SFTConfig, None, ["peft.method=lora", f"peft.target_modules={raw}"]).peft.target_modules == want


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["learning_rate=1"], "did you mean 'lr'"),
        (["lr=fast"], "bad value for 'lr'"),
        (["schedule=cosin"], "bad value for 'schedule'"),
        (["batch_size=0"], "bad value for 'batch_size'"),
        (["lr"], "expected key=value"),
    ],
)
def test_config_errors_are_one_line(overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_sft_cli_end_to_end(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(32))
    ev = write_jsonl(tmp_path / "eval.jsonl", chat_rows(8))
    out = tmp_path / "out"
    res = run_cli("sft", f"model={tiny_model_dir}", f"data={data}", f"eval_data={ev}", f"output_dir={out}",
                  "max_steps=30", "batch_size=4", "lr=5e-3", "warmup_steps=2", "progress=false", "log_every=1",
                  "eval_every=15")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 30 and len(evals) == 2
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.6 * sum(r["loss"] for r in train[:5]) / 5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 0.5
    for f in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", "curves.png"):
        assert (out / f).exists(), f
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_data_inspect_shows_mask(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2))
    res = run_cli("data", "inspect", data, f"model={tiny_model_dir}", "rows=1")
    assert res.returncode == 0, res.stderr
    assert "--- trained text: 'Итого: 13 рублей.<|im_end|>26<|im_end|>'" in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert any(" T " in ln for ln in lines) and any(" . " in ln for ln in lines)


@pytest.mark.parametrize(
    "make_args, needle",
    [
        (lambda d, m, o: ["sft", f"model={m}", f"data={d / 'missing.jsonl'}", f"output_dir={o}"], "not found"),
        (lambda d, m, o: ["sft", f"model={d}", f"data={d / 'train.jsonl'}", f"output_dir={o}"], "not a model folder"),
        (lambda d, m, o: ["sft", f"model={m}", f"data={d / 'train.jsonl'}", "lerning_rate=1"], "did you mean 'lr'"),
        (lambda d, m, o: ["sft", f"model={m}", f"data={d / 'cols.jsonl'}", f"output_dir={o}"], "missing columns"),
        (lambda d, m, o: ["sft", f"model={m}", f"data={d / 'row.jsonl'}", f"output_dir={o}"], "row 2"),
        (lambda d, m, o: ["sft", f"model={m}", f"data={d / 'train.jsonl'}", f"output_dir={o}", "max_length=3"],
         "every row was dropped"),
        (lambda d, m, o: ["sftt"], "did you mean 'sft'"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, make_args, needle):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    write_jsonl(tmp_path / "row.jsonl", [chat_rows(1)[0], {"messages": [{"role": "user"}]}])
    out = tmp_path / "out"
    res = run_cli(*make_args(tmp_path, tiny_model_dir, out))
    assert res.returncode == 2, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("alignkit: error:") and needle in err[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_existing_run_is_not_overwritten(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    out = tmp_path / "out"
    args = ["sft", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_steps=2", "batch_size=4",
            "progress=false"]
    assert run_cli(*args).returncode == 0
    res = run_cli(*args)
    assert res.returncode == 2 and "already holds a run" in res.stderr


def test_declared_dependencies_accept_a_newer_torch():
    """pyproject's requirements resolve against torch 2.15 without installing it: no upper cap
    that would make `pip install alignkit` downgrade a user's torch. Offline: the specifiers are
    checked with `packaging`, and every other requirement against what this environment holds."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    from packaging.requirements import Requirement

    meta = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in meta["dependencies"]}
    torch_spec = reqs["torch"].specifier
    for newer in ("2.13.0", "2.14.0", "2.15.0", "2.15.1", "3.0.0"):
        assert torch_spec.contains(newer), f"torch {newer} rejected by {torch_spec}"
    assert not torch_spec.contains("2.3.0")  # the floor stays
    for name, req in reqs.items():
        if name == "torch":
            continue
        assert not any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{name} is capped: {req}"
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        assert req.specifier.contains(have, prereleases=True), f"installed {name} {have} does not satisfy {req}"
