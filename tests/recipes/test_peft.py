"""Adapters and partial training: every peft method trains through SFT, saved adapters load the
way peft users load them, merge is exact, resume with an adapter is exact, frozen weights stay
bit-identical, the adapter-off reference is the base model, and bad settings stop with one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main as cli_main
from alignkit.config import SFTConfig, load_config
from alignkit.errors import UserError
from alignkit.models import load_model, load_tokenizer
from alignkit.models.peft import prepare_trainable, reference_logps_context, transformer_blocks
from alignkit.ops.logprobs import causal_lm_token_logps, shift_targets
from alignkit.recipes.sft import train_sft
from alignkit.training.trainer import Trainer

from conftest import build_tiny_model, chat_rows, write_jsonl

QUIET = ["progress=false", "tensorboard=false", "log_every=1", "logits_chunk_size=64"]


def sft_cfg(model_dir, data, out, *extra) -> SFTConfig:
    return load_config(SFTConfig, None, [f"model={model_dir}", f"data={data}", f"output_dir={out}", "batch_size=4",
                                         "schedule=constant", *QUIET, *extra])


def losses(run: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r.get("kind") == "train"]


@pytest.fixture(autouse=True, scope="module")
def _no_plots():
    """The loss-curve PNG (matplotlib, seconds per run) is not under test here."""
    import alignkit.training.trainer as trainer_mod

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_mod, "plot_metrics", lambda *a, **k: None)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def data4(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("peft_data") / "d.jsonl", chat_rows(4))


def ids_batch(seed=0, B=2, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask


def error_line(stderr: str) -> str:
    """The CLI's error: exactly one line, the last one, no traceback (info lines may precede it)."""
    lines = stderr.strip().splitlines()
    errs = [ln for ln in lines if ln.startswith("alignkit: error:")]
    assert len(errs) == 1 and lines[-1] == errs[0] and "Traceback" not in stderr, stderr
    return errs[0]


# ------------------------------------------------------------------------------------------ methods train

# (method, lr, extra keys). The same 4 rows every step, so a falling loss is the adapter learning them.
METHODS = [
    ("lora", 1e-2, []),
    ("rslora", 1e-2, ["peft.rslora=true"]),
    ("dora", 1e-2, []),
    ("prefix", 3e-1, []),
    ("prompt", 1.0, []),
    ("oft", 3e-2, []),
    ("boft", 1e-1, []),
    ("ia3", 1.0, []),
]
PEFT_TYPE = {"lora": "LORA", "rslora": "LORA", "dora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
             "oft": "OFT", "boft": "BOFT", "ia3": "IA3"}


@pytest.mark.parametrize("name,lr,extra", METHODS, ids=[m[0] for m in METHODS])
def test_each_method_trains_only_its_adapter_and_loss_falls(tiny_model_dir, data4, tmp_path, capsys, name, lr,
                                                           extra):
    method = "lora" if name == "rslora" else name
    out = tmp_path / name
    base = load_model(str(tiny_model_dir))
    before = [(n, p, p.detach().clone()) for n, p in base.named_parameters()]
    n_base = sum(p.numel() for p in base.parameters())
    train_sft(sft_cfg(tiny_model_dir, data4, out, "max_steps=8", f"lr={lr}", f"peft.method={method}", *extra),
              model=base)
    ls = losses(out)
    assert len(ls) == 8 and all(math.isfinite(x) for x in ls)
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert last < first - 1e-3, (name, ls)
    # only the adapter trained: every base weight (peft wraps `base` in place) is frozen and bit-identical
    for n, p, p0 in before:
        assert not p.requires_grad and torch.equal(p, p0), n
    # the run folder holds the adapter (not a full model), recording its base as an absolute path
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == PEFT_TYPE[name]
    assert conf["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    # the printed count: trainable = exactly what the adapter file holds, total = base + adapter
    n_adapter = sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
    assert f"parameters: {n_adapter:,} trainable of {n_base + n_adapter:,}" in capsys.readouterr().err
    if name == "rslora":
        import peft

        m = peft.PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(out))
        layer = m.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(16.0 / math.sqrt(8))


def test_prompt_tuning_logps_skip_the_virtual_tokens(tiny_model_dir):
    """Prompt tuning prepends virtual tokens: the per-token log-probs the SFT loss uses must be
    those of the real tokens, against an independent computation through inputs_embeds."""
    import peft

    model = load_model(str(tiny_model_dir))
    pm = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    ids, mask = ids_batch()
    targets = shift_targets(ids, mask)
    lp = causal_lm_token_logps(pm, ids, attention_mask=mask, targets=targets, chunk_size=4)
    assert lp.shape == ids.shape
    base = pm.get_base_model()
    virt = pm.prompt_encoder["default"].embedding.weight.unsqueeze(0).expand(2, -1, -1)
    emb = torch.cat([virt, base.get_input_embeddings()(ids)], 1)
    am = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], 1)
    logits = base(inputs_embeds=emb, attention_mask=am).logits[:, 5:]
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = ref * (targets != -100)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    # and the virtual tokens matter (the check above would be vacuous otherwise)
    plain = causal_lm_token_logps(base, ids, attention_mask=mask, targets=targets)
    assert (plain - lp).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ a LoRA run

@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, data4, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    train_sft(sft_cfg(tiny_model_dir, data4, out, "max_steps=6", "lr=1e-2", "peft.method=lora", "peft.r=4",
                      "peft.dropout=0.1", "peft.target_modules=[q_proj,v_proj,down_proj]", "save_every=3",
                      "save_total_limit=5"))
    return out


def test_saved_adapter_loads_like_any_peft_adapter(tiny_model_dir, lora_run):
    import peft
    from transformers import AutoModelForCausalLM

    ids, mask = ids_batch(1)
    a = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(lora_run))
    b = peft.AutoPeftModelForCausalLM.from_pretrained(str(lora_run))
    c = load_model(str(lora_run))  # alignkit's own loader: model=RUN_DIR continues from an adapter run
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    outs = [m.eval()(input_ids=ids, attention_mask=mask).logits for m in (a, b, c, base)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert (outs[0] - outs[3]).abs().max() > 1e-4  # the adapter trained
    targets = {n.split(".")[-3] for n in load_file(str(lora_run / "adapter_model.safetensors"))}
    assert targets == {"q_proj", "v_proj", "down_proj"}


def test_lora_resume_equals_uninterrupted(tiny_model_dir, data4, lora_run, tmp_path):
    """Train 6 steps with a checkpoint every 3; drop everything after step 3 (as a kill would) and
    resume: the final adapter equals the uninterrupted run's bit for bit (LoRA dropout on, so the
    RNG state is part of it)."""
    out = tmp_path / "b"
    shutil.copytree(lora_run / "checkpoints" / "step-0000003", out / "checkpoints" / "step-0000003")
    shutil.copy(lora_run / "metrics.jsonl", out / "metrics.jsonl")
    train_sft(sft_cfg(tiny_model_dir, data4, out, "max_steps=6", "lr=1e-2", "peft.method=lora", "peft.r=4",
                      "peft.dropout=0.1", "peft.target_modules=[q_proj,v_proj,down_proj]", "save_every=3",
                      "save_total_limit=5", "resume=true"))
    a, b = load_file(str(lora_run / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    mid = load_file(str(lora_run / "checkpoints" / "step-0000003" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # steps 4..6 changed the adapter
    assert losses(out) == losses(lora_run)


@pytest.mark.parametrize("change,needle,load_needle", [
    (["peft.method=lora", "peft.r=8"], "peft.r: 4 -> 8", "size mismatch"),
    (["peft.method=dora", "peft.r=4"], "peft.method: 'lora' -> 'dora'", "missing"),
    (["peft.method=none"], "peft.method: 'lora' -> 'none'", "holds an adapter"),
])
def test_resume_with_other_peft_settings_is_one_line(tiny_model_dir, data4, lora_run, tmp_path, capsys, change,
                                                     needle, load_needle):
    """Refused from the checkpoint's config.yaml; without one, from the weights that do not fit."""
    out = tmp_path / "c"
    shutil.copytree(lora_run / "checkpoints" / "step-0000003", out / "checkpoints" / "step-0000003")
    args = ["sft", f"model={tiny_model_dir}", f"data={data4}", f"output_dir={out}", "batch_size=4", *QUIET,
            "max_steps=6", "lr=1e-2", "peft.dropout=0.1", "peft.target_modules=[q_proj,v_proj,down_proj]",
            "resume=true", *change]
    rc = cli_main(args)
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and "same peft" in err and needle in err, err
    (out / "checkpoints" / "step-0000003" / "config.yaml").unlink()
    rc = cli_main(args)
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and "same peft" in err and load_needle in err, err


# ------------------------------------------------------------------------------------------ merge

def _logits(model, ids, mask):
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits


def test_merge_trained_lora_equals_adapter_model(lora_run, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli_main(["merge", f"adapter={lora_run}", f"output={out}"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no peft involved
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(str(lora_run))
    ids, mask = ids_batch(2)
    torch.testing.assert_close(_logits(merged, ids, mask), _logits(adapter, ids, mask), atol=1e-5, rtol=0)
    assert load_tokenizer(str(out)).pad_token_id is not None
    # an existing output is not overwritten silently
    assert cli_main(["merge", f"adapter={lora_run}", f"output={out}"]) == 2
    assert "overwrite=true" in error_line(capsys.readouterr().err)


def _random_adapter(method: str):
    import peft

    if method == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", init_lora_weights=False)
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=8, target_modules="all-linear", init_weights=False)
    if method == "boft":
        return peft.BOFTConfig(boft_block_size=4, target_modules="all-linear", init_weights=False)
    return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                          init_ia3_weights=False)


@pytest.mark.parametrize("method", ["dora", "oft", "boft", "ia3"])
def test_merge_other_methods_equals_adapter_model(tiny_model_dir, tmp_path, method):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pm = peft.get_peft_model(load_model(str(tiny_model_dir)), _random_adapter(method))
    if method == "ia3":  # non-trivial scales
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "ia3_l" in n:
                    p.uniform_(0.5, 1.5)
    adir = tmp_path / "adapter"
    pm.save_pretrained(adir)
    out = tmp_path / "merged"
    assert cli_main(["merge", f"adapter={adir}", f"output={out}", f"base={tiny_model_dir}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    ids, mask = ids_batch(3)
    ref = _logits(pm, ids, mask)
    assert (ref - _logits(load_model(str(tiny_model_dir)), ids, mask)).abs().max() > 1e-3  # adapter is not identity
    torch.testing.assert_close(_logits(merged, ids, mask), ref, atol=1e-5, rtol=0)


def test_merge_refuses_bad_or_unmergeable_adapters(tiny_model_dir, tmp_path, capsys):
    import peft

    assert cli_main(["merge", f"adapter={tmp_path / 'missing'}", f"output={tmp_path / 'o'}"]) == 2
    assert "does not exist" in error_line(capsys.readouterr().err)
    assert cli_main(["merge", f"adapter={tiny_model_dir}", f"output={tmp_path / 'o'}"]) == 2  # a full model folder
    assert "no adapter_config.json" in error_line(capsys.readouterr().err)
    pm = peft.get_peft_model(load_model(str(tiny_model_dir)),
                             peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(tmp_path / "prompt")
    assert cli_main(["merge", f"adapter={tmp_path / 'prompt'}", f"output={tmp_path / 'o'}"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "cannot be merged" in err and "PeftModel.from_pretrained" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ reference

@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_adapter_off_reference_equals_base_logps(tiny_model_dir, method):
    import peft

    base = load_model(str(tiny_model_dir))
    ids, mask = ids_batch(4)
    targets = shift_targets(ids, mask)
    with torch.no_grad():
        ref = causal_lm_token_logps(base, ids, attention_mask=mask, targets=targets)
    conf = (peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.5)
            if method == "lora" else peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm = peft.get_peft_model(load_model(str(tiny_model_dir)), conf)
    pm.train()
    on = causal_lm_token_logps(pm, ids, attention_mask=mask, targets=targets)
    assert (on - ref).abs().max() > 1e-4  # the adapter changes the output
    with reference_logps_context(pm) as ref_model:
        off = causal_lm_token_logps(ref_model, ids, attention_mask=mask, targets=targets)
        assert not off.requires_grad
    if method == "lora":
        assert torch.equal(off, ref)  # same weights, same kernels: bit-identical
    else:  # full-logits path vs the base model's split path: same math, different summation order
        torch.testing.assert_close(off, ref, atol=1e-6, rtol=0)
    assert pm.training  # train mode restored
    after = causal_lm_token_logps(pm.eval(), ids, attention_mask=mask, targets=targets)
    assert (after - ref).abs().max() > 1e-4  # adapter back on
    with pytest.raises(ValueError):
        with reference_logps_context(base):
            pass


# ------------------------------------------------------------------------------------------ partial training

def test_train_last_layers_freezes_the_rest_bit_identically(tiny_model_dir, data4, tmp_path):
    model = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_sft(sft_cfg(tiny_model_dir, data4, tmp_path / "run", "max_steps=3", "lr=1e-2", "train_last_layers=1"),
              model=model)
    trained = {k for k in before if k.startswith("model.layers.1.") or k == "model.norm.weight"}
    for k, v in model.state_dict().items():
        if k in trained:
            assert not torch.equal(v, before[k]), f"{k} should have trained"
        else:
            assert torch.equal(v, before[k]), f"{k} should be frozen"
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))  # the saved full model has the same weights
    for k in saved:
        assert torch.equal(saved[k], model.state_dict()[k])


def test_train_modules_regex_and_the_optimizer_holds_only_trainable(tiny_model_dir, data4, tmp_path):
    model = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = sft_cfg(tiny_model_dir, data4, tmp_path / "run", "max_steps=3", "lr=1e-2", r"train_modules=mlp\.(up|down)")
    model = prepare_trainable(model, cfg, log=lambda s: None)
    tr = Trainer(cfg, model, recipe="sft", total_steps=3, log=lambda s: None)
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    want = {id(p) for n, p in model.named_parameters() if "mlp.up_proj" in n or "mlp.down_proj" in n}
    assert in_opt == want and len(want) == 4
    train_sft(cfg, model=model)
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == (k in {f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1) for m in ("up", "down")}), k


def test_train_last_layers_picks_the_last_blocks(tmp_path, tiny_model_dir):
    d = tmp_path / "three"
    shutil.copytree(tiny_model_dir, d)
    build_tiny_model(d, len(load_tokenizer(str(d))), layers=3)
    model = load_model(str(d))
    name, blocks = transformer_blocks(model)
    assert name == "model.layers" and len(blocks) == 3
    cfg = load_config(SFTConfig, None, [f"model={d}", "train_last_layers=2"])
    model = prepare_trainable(model, cfg, log=lambda s: None)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[2] for n in train if n.startswith("model.layers.")} == {"1", "2"}
    assert train - {n for n in train if n.startswith(("model.layers.1.", "model.layers.2."))} == {"model.norm.weight"}
    # with an adapter: adapters only in the last k blocks
    cfg = load_config(SFTConfig, None, [f"model={d}", "train_last_layers=1", "peft.method=lora"])
    pm = prepare_trainable(load_model(str(d)), cfg, log=lambda s: None)
    layers = {n.split("layers.")[1].split(".")[0] for n, p in pm.named_parameters() if p.requires_grad}
    assert layers == {"2"}
    with pytest.raises(UserError, match="3 transformer blocks"):
        prepare_trainable(load_model(str(d)), load_config(SFTConfig, None, [f"model={d}", "train_last_layers=4"]))


# ------------------------------------------------------------------------------------------ one-line errors

def _sft_cli(tiny_model_dir, data, out, *extra):
    return ["sft", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "batch_size=4", "max_steps=1",
            *QUIET, *extra]


@pytest.mark.parametrize("extra,needle", [
    (["train_modules=nomatch"], "matches no parameter"),
    (["train_modules=("], "not a valid regular expression"),
    (["peft.method=lora", "peft.target_modules=[nosuchmodule]"], "peft.target_modules"),
    (["peft.method=lora", "train_modules=mlp"], "peft.modules_to_save"),
    (["peft.method=prompt", "packing=true"], "packing"),
    (["peft.method=prefix", "train_last_layers=1"], "train_last_layers"),
    (["peft.methd=lora"], "did you mean 'peft.method'"),
    (["peft.method=none", "train_modules=nomatch"], "matches no parameter"),  # 'none' is a method, not null
])
def test_bad_settings_exit_2_with_one_line(tiny_model_dir, data4, tmp_path, capsys, extra, needle):
    rc = cli_main(_sft_cli(tiny_model_dir, data4, tmp_path / "r", *extra))
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and needle in err, err


def test_zero_trainable_parameters_is_an_error(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="0 trainable parameters"):
        Trainer(SFTConfig(model=str(tiny_model_dir), progress=False, tensorboard=False), model, recipe="sft",
                total_steps=1, log=lambda s: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_qlora_without_cuda_is_one_clear_line(tiny_model_dir, data4, tmp_path, capsys):
    rc = cli_main(_sft_cli(tiny_model_dir, data4, tmp_path / "q", "peft.method=qlora"))
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and "CUDA" in err and "peft.method=lora" in err, err


def test_continue_training_a_saved_adapter(tiny_model_dir, data4, lora_run, tmp_path, capsys):
    """model= a saved adapter run, peft.method=none: the adapter trains further (base frozen);
    asking for a new adapter on top is a one-line error pointing at `alignkit merge`."""
    out = tmp_path / "more"
    train_sft(sft_cfg(lora_run, data4, out, "max_steps=2", "lr=1e-2"))
    a, b = load_file(str(lora_run / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a if "lora_B" in k)
    rc = cli_main(_sft_cli(lora_run, data4, tmp_path / "x", "peft.method=lora"))
    assert rc == 2 and "alignkit merge" in error_line(capsys.readouterr().err)
