"""What a user reads: eval sample labels (the data's reference answer vs the reference model's
sample), `--help` option lists shown whole and descriptions once, `--version`."""

from __future__ import annotations

import json
import re

import pytest

from alignkit import __version__
from alignkit.cli import COMMANDS, command_help, main
from alignkit.toy import world


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("outdata")
    return world.write_jsonl(world.prompt_rows(3, seed=0, split="eval"), d / "prompts.jsonl")


def test_eval_labels_reference_answer_and_reference_model_apart(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", f"model={tiny_model_dir}", f"ref_model={tiny_model_dir}", f"prompts={prompts}", "reward=toy",
               "n_samples=1", "temperature=1.0", "max_new_tokens=6", f"output_dir={out}", "num_show=3"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = world.read_jsonl(prompts)
    items = json.loads((out / "eval.json").read_text())["samples"]["zero_shot"]
    assert len(items) == 3
    for it, row in zip(items, rows):
        # ref_answer is the data's answer, never the reference model's sample
        assert it["ref_answer"] == row["answer"] == f"Итого: {row['total']} рублей."
        assert "ref_model_completion" in it and "ref_completion" not in it
        assert it["correct"] is (world.parse_total(it["completion"]) == row["total"])
        assert isinstance(it["ref_model_correct"], bool)
    for row in rows:
        assert f"reference answer (from data):  Итого: {row['total']} рублей." in printed
    assert printed.count("completion (model):") == 3 and printed.count("completion (reference model):") == 3
    assert re.search(r"completion \(model\):.*\[(right|wrong)\]", printed)


@pytest.mark.parametrize("name", ["sft", "dpo", "rm", "grpo", "ppo", "eval", "demo", "merge", "report"])
def test_help_shows_whole_option_lists_and_the_description_once(name):
    from alignkit.config import help_table

    text = command_help(COMMANDS[name])
    lines = text.splitlines()
    for key, typ, _, _ in help_table(COMMANDS[name].config()):
        line = next(ln for ln in lines if ln.startswith(f"  {key} "))
        assert f" {typ}" in line, (key, typ, line)  # e.g. auto|float32|bfloat16|float16, whole
    head = text.split("keys:")[0].lower()
    first = COMMANDS[name].summary.lower().split()[:4]
    assert head.count(" ".join(first)) <= 1, head  # not the summary and a docstring saying the same


def test_help_long_type_is_not_cut():
    text = command_help(COMMANDS["dpo"])
    assert "token_mean|seq_mean_token_mean" in text or "token_me\n" not in text
    assert "float1 " not in text and "prefix| " not in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alignkit {__version__}"
