"""Bad input for multi-turn runs (tools=, env=): one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("agent_prompts")
    return write_jsonl(d / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?"} for i in range(16)])


TOOLS_SRC = '''
def good(x: int) -> int:
    """Doubles.

    Args:
        x: A number.
    """
    return 2 * x


def undocumented(x: int) -> int:
    return x


def unhinted(x):
    """No type hints.

    Args:
        x: A number.
    """
    return x


class NoStep:
    def reset(self, row):
        return row["prompt"]
'''


@pytest.mark.parametrize("extra,message", [
    (["tools=no_such_module_xyz:calc"], "cannot import no_such_module_xyz"),
    (["tools={tools}:undocumented"], "no docstring"),
    (["tools={tools}:unhinted"], "type hint"),
    (["tools={tools}:good"], "chat template of this tokenizer has no tool support"),
    (["env={tools}:NoStep"], "has no step method"),
    (["env={tools}:Missing"], "has no 'Missing'"),
])
def test_bad_agent_input_is_one_line_exit_2_nothing_written(extra, message, tiny_model_dir, prompts, tmp_path,
                                                              capsys):
    from alignkit.cli import main

    src = tmp_path / "mytools.py"
    src.write_text(TOOLS_SRC)
    out = tmp_path / "run"
    code = main(["grpo", f"model={tiny_model_dir}", f"data={prompts}", f"output_dir={out}", "max_steps=1",
                 "progress=false", *[e.format(tools=src) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
