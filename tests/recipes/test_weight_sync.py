"""Weight sync to an inference engine (alignkit.rollout.weight_sync), without the engine: which
tensors are sent, under which names, merged how, and only when they changed."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.errors import UserError
from alignkit.rollout.weight_sync import changed_buckets, weight_units
from conftest import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tied(tmp_path):
    return build_tiny_model(tmp_path, 50, hidden=32, tie=True)


def sent(model, last, bucket_bytes=1 << 30, full=False):
    return [b for b in changed_buckets(model, last, bucket_bytes, full=full)]


def test_names_are_checkpoint_names_tied_head_sent_once(tied):
    names = [n for b in sent(tied, {}) for n, _ in b]
    ckpt = set(tied.state_dict())
    assert set(names) == ckpt - {"lm_head.weight"}  # the tied head is the embedding
    assert len(names) == len(set(names))


def test_untied_head_is_sent(tmp_path):
    m = build_tiny_model(tmp_path, 50, hidden=32, tie=False)
    assert "lm_head.weight" in [n for b in sent(m, {}) for n, _ in b]


def test_only_changed_units_after_a_step_and_fused_layers_whole(tied):
    for p in tied.parameters():
        p.requires_grad_(False)
    q = tied.model.layers[1].self_attn.q_proj.weight
    q.requires_grad_(True)
    last: dict = {}
    sent(tied, last)
    assert sent(tied, last) == []  # nothing changed: nothing sent
    opt = torch.optim.AdamW([q], lr=1e-2)
    tied(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    names = [n for b in sent(tied, last) for n, _ in b]
    # q changed; k and v load into the same fused engine layer, so they travel with it
    assert names == [f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv"]
    assert sent(tied, last) == []


def test_fused_adamw_and_load_state_dict_count_as_changes(tied):
    last: dict = {}
    sent(tied, last)
    opt = torch.optim.AdamW(tied.parameters(), lr=1e-2, fused=True)
    tied(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    assert len([n for b in sent(tied, last) for n, _ in b]) == len(set(tied.state_dict())) - 1
    tied.load_state_dict(copy.deepcopy(tied.state_dict()))  # the same values: nothing to send
    assert sent(tied, last) == []
    sd = copy.deepcopy(tied.state_dict())
    sd["model.norm.weight"][3] += 1e-6  # one element, one ulp-scale change
    tied.load_state_dict(sd)
    assert [n for b in sent(tied, last) for n, _ in b] == ["model.norm.weight"]


def test_buckets_are_bounded_and_carry_every_unit(tied):
    units = weight_units(tied)
    limit = max(u.nbytes for u in units)
    buckets = sent(tied, {}, bucket_bytes=limit)
    assert len(buckets) > 1
    for b in buckets:
        assert sum(t.numel() * t.element_size() for _, t in b) <= limit
    assert sorted(n for b in buckets for n, _ in b) == sorted(n for u in units for n in u.names)


def test_lora_is_merged_without_touching_the_training_model(tied):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tied, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    got = dict(t for b in sent(pm, {}) for t in b)
    assert all(torch.equal(before[k], v) for k, v in pm.state_dict().items())  # not merged in place
    ref = copy.deepcopy(pm).merge_and_unload().state_dict()  # peft's own merge, on a copy
    assert set(got) == set(ref) - {"lm_head.weight"}
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    # a step on the adapter changes exactly the adapted layers' merged weights
    last: dict = {}
    sent(pm, last)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    names = {n for b in sent(pm, last) for n, _ in b}
    assert names == {f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(2) for x in "qkv"}


def test_unsupported_adapters_and_quantised_bases_are_refused(tied):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    dora = get_peft_model(copy.deepcopy(tied), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UserError, match="DoRA"):
        weight_units(dora)
    pt = get_peft_model(copy.deepcopy(tied), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(UserError, match="only LoRA"):
        weight_units(pt)
    q = copy.deepcopy(tied)
    q.config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(UserError, match="quantised"):
        weight_units(q)


FSDP_SYNC = r"""
import sys, torch
from safetensors.torch import load_file
from alignkit.config import SFTConfig
from alignkit.models import load_tokenizer
from alignkit.models.peft import load_base_model, prepare_trainable
from alignkit.rollout.weight_sync import changed_buckets
from alignkit.training.dist import init_distributed, shutdown
from alignkit.training.trainer import Trainer

model_dir, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
d = init_distributed()
cfg = SFTConfig(model=model_dir, output_dir=out, distributed="fsdp", progress=False, tensorboard=False,
                peft={"method": method})
model = prepare_trainable(load_base_model(cfg), cfg)
tr = Trainer(cfg, model, load_tokenizer(model_dir), recipe="t", total_steps=1, log=lambda s: None, dist_info=d)
disk = load_file(f"{model_dir}/model.safetensors")
assert any(hasattr(p, "full_tensor") for p in tr.model.parameters())  # sharded
last = {}
got = {n: t.clone() for b in changed_buckets(tr.model, last, bucket_bytes=4096) for n, t in b}
assert set(got) == set(disk) - {"lm_head.weight"}, sorted(set(got) ^ set(disk))
for k, v in got.items():  # gathered whole on every rank; LoRA B starts at 0, so merged == base
    assert torch.equal(v, disk[k]), k
assert [b for b in changed_buckets(tr.model, last, 4096)] == []
# a change on rank 0's shard only: both ranks gather that unit (and only it)
name = "model.layers.1.mlp.down_proj"
mod = tr.model.get_submodule(("base_model.model." if method == "lora" else "") + name)
if d.rank == 0:
    with torch.no_grad():
        (mod.weight if method == "none" else mod.lora_B["default"].weight)._local_tensor.add_(0.5)
sent = {n: t for b in changed_buckets(tr.model, last, 4096) for n, t in b}
assert list(sent) == [name + ".weight"], list(sent)
assert not torch.equal(sent[name + ".weight"], disk[name + ".weight"])
# inside gathered() no collective runs: rank 1 may sync more often than rank 0
with tr.gathered():
    n = 3 if d.rank == 1 else 1
    for _ in range(n):
        list(changed_buckets(tr.model, {}, 1 << 30))
print("ok", d.rank)
del tr, model
shutdown()
"""


@pytest.mark.parametrize("method", ["none", "lora"])
def test_fsdp_gathers_unit_by_unit_and_ranks_agree(tiny_model_dir, tmp_path, method):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "fsdp_sync.py"
    script.write_text(FSDP_SYNC)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root / "tests"))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tiny_model_dir), str(tmp_path / "r"), method],
                         capture_output=True, text=True, env=env, timeout=300, cwd=str(root))
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("ok") == 2


def test_fingerprint_is_chunk_independent_and_sees_one_element(monkeypatch):
    import alignkit.rollout.weight_sync as ws

    p = torch.nn.Parameter(torch.randn(37, 11))
    whole = ws._sig(p)
    monkeypatch.setattr(ws, "_CHUNK", 10)  # many chunks, one partial
    assert ws._sig(p) == whole
    with torch.no_grad():
        p.view(-1)[205] = torch.nextafter(p.view(-1)[205], torch.tensor(10.0))  # one ulp, mid-chunk
    assert ws._sig(p) != whole


def test_lora_on_a_tied_head_is_refused(tied):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tied, LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(UserError, match="tied to another layer"):
        weight_units(pm)
