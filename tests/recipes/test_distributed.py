"""FSDP2 on CPU (gloo, 2 processes): SFT, LoRA and DPO equal one process on the same global batch,
GRPO gradients equal one process and a GRPO run equals the same run under DDP, sharded checkpoints
resume on another number of processes, the consolidated model is the unsharded one and loads in
plain transformers; `distributed=auto` and the refusals; activation checkpointing in every recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main as cli_main
from alignkit.config import SFTConfig
from alignkit.errors import UserError
from alignkit.training.fsdp import resolve_mode

from conftest import ROOT, chat_rows, free_port, write_jsonl

PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
COMMON = ["progress=false", "tensorboard=false", "plot=false", "log_every=1", "logits_chunk_size=16"]


def torchrun(*args, check=True) -> subprocess.CompletedProcess:
    # A fresh port per launch: a fixed one can still be held by the previous launch's store.
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300,
                         cwd=str(ROOT))
    if check:  # the first error of the processes, not only torchrun's summary at the end
        errors = [ln for ln in res.stderr.splitlines() if "Error" in ln or "error:" in ln][:8]
        assert res.returncode == 0, "\n".join(errors) + "\n" + res.stderr[-3000:]
    return res


def single(*args) -> None:
    res = subprocess.run([PY, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-4000:]


def train_metrics(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_run(a: Path, b: Path, keys=("loss", "grad_norm", "units"), rel=1e-5, atol=1e-6):
    ma, mb = train_metrics(a), train_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-7), (k, ra["step"])
    assert_same_weights(a, b, atol=atol)


def assert_same_weights(a: Path, b: Path, atol=1e-6, name="model.safetensors"):
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dist_data") / "d.jsonl", chat_rows(16))


# ------------------------------------------------------------------------------------------ SFT


def test_sft_fsdp_equals_one_process_and_resumes_on_one(tiny_model_dir, sft_data, tmp_path):
    """2 ranks x batch 2 under FSDP2 (with activation checkpointing) == 1 process x batch 4, step by step
    and in the final weights; the sharded checkpoint of step 2 resumes on one process (batch 2 x 2
    micro-batches: the same global batch) to the same end; the consolidated model is the unsharded one."""
    sft = ["-m", "alignkit", "sft", f"model={tiny_model_dir}", f"data={sft_data}", "lr=3e-3", "warmup_steps=1",
           *COMMON]
    fsdp, one, resumed = tmp_path / "fsdp", tmp_path / "one", tmp_path / "resumed"
    torchrun(*sft, "max_steps=4", "batch_size=2", f"output_dir={fsdp}", "distributed=fsdp", "save_every=2",
             "gradient_checkpointing=true", "fsdp.consolidate_checkpoints=true")
    single(*sft, "max_steps=4", "batch_size=4", f"output_dir={one}")
    # Losses and grad norms agree to 1e-7. The weights agree to rounding: the head's gradient is summed
    # chunk by chunk on one process but per rank, then reduced, on two, and Adam scales each
    # element by its own running size, so the order shows up to ~6e-6 after 4 steps at lr 3e-3; a
    # reduction fault would move weights by about lr.
    assert_same_run(fsdp, one, atol=2e-5)

    ck = fsdp / "checkpoints" / "step-0000002"
    assert (ck / "sharded").is_dir() and {p.name for p in ck.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    state = json.loads((ck / "trainer_state.json").read_text())["state"]  # no pickle in a checkpoint
    assert not list(ck.glob("*.pt"))
    assert state["distributed"] == "fsdp" and state["world"] == 2 and state["optimizer"] is None

    single(*sft, "max_steps=4", "batch_size=2", "grad_accum=2", f"output_dir={resumed}", f"resume={ck}")
    assert [r["step"] for r in train_metrics(resumed)] == [3, 4]
    for ra, rb in zip(train_metrics(resumed), train_metrics(one)[2:]):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert_same_weights(resumed, one, atol=2e-5)  # rounding, as above

    # The consolidated folders load in plain transformers and equal the unsharded model.
    from transformers import AutoModelForCausalLM

    assert json.loads((fsdp / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    m = AutoModelForCausalLM.from_pretrained(str(fsdp))
    ref = load_file(str(one / "model.safetensors"))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, ref.get(k, ref["model.embed_tokens.weight"] if k == "lm_head.weight" else None),
                                   atol=2e-5, rtol=1e-5, msg=k)
    mid = AutoModelForCausalLM.from_pretrained(str(ck))  # fsdp.consolidate_checkpoints=true
    assert torch.equal(mid.lm_head.weight, mid.model.embed_tokens.weight)
    # On request, later: resume the sharded checkpoint on one process with max_steps at its step.
    single(*sft, "max_steps=2", "batch_size=4", f"output_dir={tmp_path / 'cons'}", f"resume={ck}")
    assert_same_weights(tmp_path / "cons", ck, atol=0)


@pytest.mark.slow
def test_sharded_resume_on_two_ranks_and_refusal(tiny_model_dir, sft_data, tmp_path):
    """A 2-step FSDP run resumed in place to 3 steps equals 3 uninterrupted steps (one process, same
    global batch); a single-process checkpoint cannot seed an FSDP run: one line, no traceback."""
    sft = ["-m", "alignkit", "sft", f"model={tiny_model_dir}", f"data={sft_data}", "lr=3e-3",
           "schedule=constant", *COMMON]  # constant: the schedule does not depend on max_steps
    one, part = tmp_path / "one", tmp_path / "part"
    single(*sft, "max_steps=3", "batch_size=4", f"output_dir={one}")
    torchrun(*sft, "max_steps=2", "batch_size=2", f"output_dir={part}", "distributed=fsdp")
    torchrun(*sft, "max_steps=3", "batch_size=2", f"output_dir={part}", "distributed=fsdp", "resume=true")
    assert [r["step"] for r in train_metrics(part)] == [1, 2, 3]
    # losses and grad norms to 1e-7; weights to rounding of the head gradient's summation order (one
    # process vs per rank then reduced, amplified by Adam: 5.5e-6 after 3 steps), as in the test above
    assert_same_run(part, one, atol=2e-5)

    res = torchrun(*sft, "max_steps=4", "batch_size=2", f"output_dir={tmp_path / 'x'}", "distributed=fsdp",
                   f"resume={one / 'checkpoints' / 'step-0000003'}", check=False)
    assert res.returncode != 0 and "written without FSDP (distributed=none)" in res.stderr, res.stderr[-2000:]
    assert f'File "{ROOT / "src"}' not in res.stderr  # no traceback through alignkit (torchrun adds its own)


def test_lora_fsdp_equals_one_process(tiny_model_dir, sft_data, tmp_path):
    sft = ["-m", "alignkit", "sft", f"model={tiny_model_dir}", f"data={sft_data}", "max_steps=3", "lr=1e-2",
           "peft.method=lora", "peft.r=4", *COMMON]
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    # distributed=auto with a threshold below the tiny model's size picks FSDP
    res = torchrun(*sft, "batch_size=2", f"output_dir={fsdp}", "distributed=auto", "fsdp.auto_min_params=1000")
    assert "distributed=auto: fsdp (32,288 parameters, fsdp from 1,000)" in res.stderr  # base + LoRA
    single(*sft, "batch_size=4", f"output_dir={one}")
    assert_same_run_adapter(fsdp, one)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(fsdp))
    assert any("lora_A" in n for n, _ in m.named_parameters())


def assert_same_run_adapter(a: Path, b: Path):
    ma, mb = train_metrics(a), train_metrics(b)
    for ra, rb in zip(ma, mb):
        for k in ("loss", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (k, ra["step"])
    assert_same_weights(a, b, name="adapter_model.safetensors")


# ------------------------------------------------------------------------------------------ DPO


def test_dpo_fsdp_equals_one_process(tiny_model_dir, tmp_path):
    from alignkit.toy import world

    data = write_jsonl(tmp_path / "pairs.jsonl", world.preference_rows(8, seed=0))
    dpo = ["-m", "alignkit", "dpo", f"model={tiny_model_dir}", f"data={data}", "max_steps=3", "lr=5e-3", "beta=0.5",
           *COMMON]
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    torchrun(*dpo, "batch_size=2", f"output_dir={fsdp}", "distributed=fsdp")
    single(*dpo, "batch_size=4", f"output_dir={one}")
    # As for DDP (test_dpo.py): float rounding of tiny gradients, amplified by Adam, up to ~lr/50.
    assert_same_run(fsdp, one, keys=("loss", "grad_norm", "units", "rewards/margin"), rel=1e-4, atol=3e-4)


# ------------------------------------------------------------------------------------------ GRPO

GRPO_GRADS = r"""
import sys, torch
from pathlib import Path
from alignkit.advantages import group_normalized
from alignkit.config import GRPOConfig
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes import online as ol
from alignkit.recipes.grpo import grpo_loss_fn, grpo_units
from alignkit.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams
from alignkit.training.dist import init_distributed
from alignkit.training.trainer import Trainer

model_dir, out = sys.argv[1], Path(sys.argv[2])
d = init_distributed()
tok = load_tokenizer(model_dir)
prompts = [[{"role": "user", "content": f"{i} + {i}"}] for i in range(8)]
# Every process samples the same 8 groups (same seed), then trains on its own 4.
batch = RolloutEngine(tok).generate(load_model(model_dir), prompts, SamplingParams(n=4, max_new_tokens=10, seed=0))
rewards = torch.tensor([sum(c.isdigit() for c in t) / max(len(t), 1) for t in batch.texts]) + torch.arange(32) % 3 * 0.1
adv = group_normalized(rewards, 4)
cfg = GRPOConfig(model=model_dir, output_dir=str(out / "r"), max_new_tokens=10, kl_coef=0.0, progress=False,
                 tensorboard=False, compute_entropy=False, distributed=sys.argv[3])
model = load_model(model_dir)
tr = Trainer(cfg, model, tok, recipe="t", total_steps=1, log=lambda s: None, dist_info=d)
all_rewards = rewards
if d.world > 1:
    lo, hi = d.rank * 16, (d.rank + 1) * 16
    batch, adv, rewards = RolloutBatch(batch.samples[lo:hi], 4), adv[lo:hi], rewards[lo:hi]
from alignkit.recipes.grpo import global_std  # scale=batch: the std of the global batch
assert abs(global_std(rewards, d) - float(all_rewards.double().std())) < 1e-12
mbs = ol.split_groups(batch, 2, len(batch.samples) // 8, tok.pad_token_id, {"advantages": adv})
for mb in mbs:
    mb["loss_mask"] = mb["completion_mask"]
m = tr.accumulate(mbs, grpo_loss_fn(cfg), grpo_units(cfg.aggregation))
gn = float(tr.optimizer_step(m)["grad_norm"])
if tr.fsdp is not None:
    tr.model.reshard()  # the sharded parameters, whose .grad was reduce-scattered
sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in tr.model.state_dict().items()}
if d.rank == 0:
    torch.save({"loss": m["loss"], "grad_norm": gn, "weights": sd}, out / f"grpo-{sys.argv[3]}.pt")
del tr, model  # the FSDP state goes before the process group
from alignkit.training.dist import shutdown
shutdown()
"""

GRPO_RUN = r"""
import sys
from alignkit.config import GRPOConfig
from alignkit.recipes.grpo import train_grpo

def digits(prompts, completions, **cols):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]

model_dir, prompts, out, mode = sys.argv[1:5]

from alignkit.recipes import online as ol
ref_pass = ol.OnlineRun.add_ref_logps

def sharded_reference(self, mbs):  # under FSDP the reference is sharded between its passes
    if mode == "fsdp":
        from torch.distributed.tensor import DTensor
        assert self.ref_fsdp is not None and isinstance(next(self.ref_fsdp.blocks[0].parameters()), DTensor)
    return ref_pass(self, mbs)

ol.OnlineRun.add_ref_logps = sharded_reference
train_grpo(GRPOConfig(model=model_dir, data=prompts, eval_data=prompts, output_dir=out, max_steps=3, batch_size=2,
                      grad_accum=2, num_generations=4, max_new_tokens=8, lr=3e-3, kl_coef=0.05, iterations=2,
                      eval_prompts=3, progress=False, tensorboard=False, plot=False, log_every=1, seed=0,
                      logits_chunk_size=16, distributed=mode), reward_fn=digits)
from alignkit.training.dist import shutdown
shutdown()
"""


EMPTY_LOAD = r"""
import sys, torch
from safetensors.torch import load_file
from alignkit.config import SFTConfig
from alignkit.models import load_tokenizer
from alignkit.models.peft import load_base_model, prepare_trainable
from alignkit.training.dist import init_distributed
from alignkit.training.trainer import Trainer

model_dir, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
d = init_distributed()
cfg = SFTConfig(model=model_dir, output_dir=out, distributed="fsdp", progress=False, tensorboard=False,
                peft={"method": method})
model = load_base_model(cfg)
# Only rank 0 reads the weights; the other ranks shard an empty model that rank 0 fills.
assert all(p.is_meta for p in model.parameters()) == (d.rank == 1)
model = prepare_trainable(model, cfg)
tr = Trainer(cfg, model, load_tokenizer(model_dir), recipe="t", total_steps=1, log=lambda s: None, dist_info=d)
with tr.gathered():  # every rank now holds the weights on disk, buffers included
    sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in tr.model.named_parameters()}
    disk = load_file(f"{model_dir}/model.safetensors")
    for k, v in disk.items():
        assert torch.equal(sd[k], v), k
    for name, b in tr.model.named_buffers():
        assert torch.isfinite(b).all() and b.abs().sum() > 0, name
    if method == "lora":  # the adapters too: rank 0's initialisation on every rank
        lora = {k: v for k, v in sd.items() if "lora_A" in k}
        got = [torch.zeros_like(v) for v in lora.values()]
        for g, v in zip(got, lora.values()):
            g.copy_(v); torch.distributed.broadcast(g, src=0); assert torch.equal(g, v)
print("ok", d.rank)
del tr, model  # the FSDP state goes before the process group
from alignkit.training.dist import shutdown
shutdown()
"""


@pytest.mark.parametrize("method", ["none", "lora"])
def test_only_rank0_reads_the_weights(tiny_model_dir, tmp_path, method):
    script = tmp_path / "empty_load.py"
    script.write_text(EMPTY_LOAD)
    torchrun(script, tiny_model_dir, tmp_path / "r", method)


def test_grpo_fsdp_gradients_equal_one_process(tiny_model_dir, tmp_path):
    """8 groups: 2 FSDP ranks x 4 groups (2 micro-batches each) == 1 process x 8 groups: same loss,
    same global gradient norm, same weights after one optimizer step."""
    script = tmp_path / "grpo_grads.py"
    script.write_text(GRPO_GRADS)
    torchrun(script, tiny_model_dir, tmp_path, "fsdp")
    single(script, tiny_model_dir, tmp_path, "none")
    a, b = torch.load(tmp_path / "grpo-fsdp.pt"), torch.load(tmp_path / "grpo-none.pt")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert sorted(a["weights"]) == sorted(b["weights"])
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], atol=1e-6, rtol=1e-5, msg=k)


def test_grpo_run_fsdp_equals_ddp(tiny_model_dir, tmp_path):
    """Whole GRPO runs (sampling on every rank, a sharded KL reference, 2 updates per rollout, uneven
    greedy evaluation 2 + 1 prompts) under FSDP2 and under DDP: the same samples, metrics and weights."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?"} for i in range(16)])
    script = tmp_path / "grpo_run.py"
    script.write_text(GRPO_RUN)
    torchrun(script, tiny_model_dir, prompts, tmp_path / "fsdp", "fsdp")
    torchrun(script, tiny_model_dir, prompts, tmp_path / "ddp", "ddp")
    assert_same_run(tmp_path / "fsdp", tmp_path / "ddp", keys=("loss", "grad_norm", "reward_mean", "kl",
                                                              "response_len"), atol=1e-5)
    ev = [[r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "eval"] for d in ("fsdp", "ddp")]
    assert ev[0] and ev[0][-1]["eval_reward"] == pytest.approx(ev[1][-1]["eval_reward"], rel=1e-6)


REWARD = """
def digits(prompts, completions, **cols):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) + 0.1 * (len(t) % 3) for t in completions]
"""


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["rm"], ["rloo", "num_generations=2"], ["reinforce"],
                                    ["online-dpo", "num_generations=2"], ["ppo"],
                                    ["ppo", "critic=shared_base", "peft.method=lora"],
                                    ["rs", "rounds=2", "sft_steps=1", "prompts_per_round=4", "num_generations=2"],
                                    ["kto"], ["dpo", "loss=orpo"], ["distill"]])
def test_other_recipes_fsdp_equal_ddp(recipe, tiny_model_dir, tmp_path):
    from alignkit.toy import world

    name, *extra = recipe
    if name in ("rm", "kto", "dpo"):  # KTO splits the pairs into desirable and undesirable rows
        data = [f"data={write_jsonl(tmp_path / 'pairs.jsonl', world.preference_rows(8, seed=0))}"]
    elif name == "distill":  # the student samples; the teacher scores every token (a second copy here)
        data = [f"data={write_jsonl(tmp_path / 'p.jsonl', world.prompt_rows(16, seed=0))}", "max_new_tokens=8",
                f"teacher={tiny_model_dir}"]
    else:
        (tmp_path / "rw.py").write_text(REWARD)
        data = [f"data={write_jsonl(tmp_path / 'p.jsonl', world.prompt_rows(16, seed=0))}",
                f"reward={tmp_path / 'rw.py'}:digits", "max_new_tokens=8", "kl_coef=0.05"]
    args = ["-m", "alignkit", name, f"model={tiny_model_dir}", *data, "max_steps=2", "batch_size=2", "lr=3e-3",
            *COMMON, *extra]
    for mode in ("fsdp", "ddp"):
        torchrun(*args, f"output_dir={tmp_path / mode}", f"distributed={mode}")
    weights = "adapter_model.safetensors" if "peft.method=lora" in extra else "model.safetensors"
    ma, mb = train_metrics(tmp_path / "fsdp"), train_metrics(tmp_path / "ddp")
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), ra["step"]
    assert_same_weights(tmp_path / "fsdp", tmp_path / "ddp", atol=1e-5, name=weights)


# ------------------------------------------------------------------------------------------ PPO's critic

PPO_CRITIC_RUN = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from alignkit.config import PPOConfig
from alignkit.recipes import ppo

def digits(prompts, completions, **cols):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) + 0.1 * (len(t) % 3) for t in completions]

model_dir, prompts, out, mode, resume = sys.argv[1:6]
steps, accum = (int(a) for a in (sys.argv[6:8] or (3, 1)))  # rollout steps; micro-batches (2 on one process)
made, meta = [], []
make = ppo.critic_trainer

def critic_trainer(cfg, critic, policy_trainer):
    meta.append(any(p.is_meta for p in critic.parameters()))  # built empty, before sharding
    made.append(make(cfg, critic, policy_trainer))
    return made[-1]

ppo.critic_trainer = critic_trainer
ppo.train_ppo(PPOConfig(model=model_dir, data=prompts, output_dir=out, max_steps=steps, batch_size=2, num_generations=2,
                        grad_accum=accum, max_new_tokens=8, lr=3e-3, critic_lr=3e-3, kl_coef=0.05, ppo_epochs=2,
                        num_minibatches=1, save_every=2, schedule="constant", progress=False, tensorboard=False,
                        plot=False, log_every=1, seed=0, logits_chunk_size=16, distributed=mode,
                        resume=resume if resume != "-" else False), reward_fn=digits)
critic_tr = made[0]
import torch.distributed as dist
from torch.distributed.tensor import DTensor
critic = critic_tr.model
if critic_tr.fsdp is not None:
    critic.reshard()  # the registered parameters: the shards (the root group is kept gathered otherwise)
local = full = 0
sharded = []
for name, p in critic.named_parameters():
    if name.startswith("backbone."):
        sharded.append(isinstance(p, DTensor))
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        full += p.numel()
adam = sum((s["exp_avg"].to_local() if isinstance(s["exp_avg"], DTensor) else s["exp_avg"]).numel()
           for s in critic_tr.optimizer.state.values())
sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
      for k, v in critic.state_dict().items()}
rank = dist.get_rank() if dist.is_initialized() else 0
(Path(out) / f"critic-numel-{rank}.json").write_text(json.dumps(
    {"mode": critic_tr.mode, "meta": meta[0], "local": local, "full": full, "all_sharded": all(sharded),
     "adam_local": adam, "critic_full": sum(v.numel() for v in sd.values())}))
if rank == 0:
    save_file(sd, str(Path(out) / "critic-trained.safetensors"))
del made, critic_tr, critic
from alignkit.training.dist import shutdown
shutdown()
"""


@pytest.mark.slow
def test_ppo_separate_critic_sharded_under_fsdp(tiny_model_dir, tmp_path):
    """PPO with a separate critic (critic_init=policy) under FSDP: (1) policy and critic end equal to
    the same run under DDP after 3 rollout steps; (2) the critic's backbone and its AdamW state are
    sharded, about half of them on each of the 2 processes, and only rank 0 read the critic's
    weights; (3) a run resumed from the sharded checkpoint of rollout step 2 (the critic in
    checkpoint folder `critic_sharded`) ends where the uninterrupted run ends, bit for bit, and one
    process reads the sharded critic too; (4) output_dir/critic loads in plain transformers and
    equals the trained critic gathered from its shards."""
    from transformers import AutoModel

    from alignkit.toy import world

    prompts = write_jsonl(tmp_path / "p.jsonl", world.prompt_rows(24, seed=0))
    script = tmp_path / "ppo_critic.py"
    script.write_text(PPO_CRITIC_RUN)
    fsdp, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    torchrun(script, tiny_model_dir, prompts, fsdp, "fsdp", "-")
    torchrun(script, tiny_model_dir, prompts, ddp, "ddp", "-")

    # (1) the same run: metrics, policy, and the critic (backbone and value head)
    assert_same_run(fsdp, ddp, keys=("loss", "grad_norm", "value_loss", "value_grad_norm", "explained_variance"),
                    atol=1e-5)
    for name in ("critic/model.safetensors", "critic/value_head.safetensors"):
        assert_same_weights(fsdp, ddp, atol=1e-5, name=name)

    # (2) sharded: each process holds about half of the critic's backbone and of its Adam moments
    numel = [json.loads((fsdp / f"critic-numel-{r}.json").read_text()) for r in (0, 1)]
    replicated = [json.loads((ddp / f"critic-numel-{r}.json").read_text()) for r in (0, 1)]
    full = numel[0]["full"]
    assert all(n["mode"] == "fsdp" and n["all_sharded"] for n in numel)
    assert sum(n["local"] for n in numel) == full
    for n in numel:
        assert 0.45 * full <= n["local"] <= 0.55 * full, n
        assert n["adam_local"] <= 0.55 * n["critic_full"], n
    assert all(n["mode"] == "ddp" and n["local"] == full for n in replicated)
    # only rank 0 read the critic's weights; rank 1 built it empty and got its shards from rank 0
    assert [n["meta"] for n in numel] == [False, True] and not any(n["meta"] for n in replicated)

    # (3) resume from the sharded checkpoint after rollout step 2 (4 optimizer steps) to the same end
    ck = fsdp / "checkpoints" / "step-0000004"
    assert (ck / "critic_sharded" / ".metadata").is_file()
    state = json.loads((ck / "trainer_state.json").read_text())["state"]
    assert "weights" not in json.dumps(state["extra"]["critic"])  # no full critic in rank 0's state
    torchrun(script, tiny_model_dir, prompts, resumed, "fsdp", ck)
    # ... and on one process (max_steps at the checkpoint: nothing to train): the critic read from its shards
    single(script, tiny_model_dir, prompts, tmp_path / "one", "none", ck, 2, 2)
    import torch.distributed.checkpoint.format_utils as dcp_utils

    dcp_utils.dcp_to_torch_save(ck / "critic_sharded", tmp_path / "critic4.pt")
    shards = torch.load(tmp_path / "critic4.pt", weights_only=True)["model"]
    loaded = load_file(str(tmp_path / "one" / "critic-trained.safetensors"))
    assert sorted(loaded) == sorted(shards) and all(torch.equal(loaded[k], shards[k]) for k in shards)
    assert [r["step"] for r in train_metrics(resumed)] == [3, 3]
    for a, b in zip(train_metrics(resumed), train_metrics(fsdp)[-2:]):
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-6), a["step"]
    for name in ("model.safetensors", "critic/model.safetensors", "critic/value_head.safetensors"):
        wa, wb = load_file(str(resumed / name)), load_file(str(fsdp / name))
        assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), name  # bit for bit

    # (4) output_dir/critic: plain transformers backbone + head, equal to the trained shards gathered
    trained = load_file(str(fsdp / "critic-trained.safetensors"))
    backbone = AutoModel.from_pretrained(str(fsdp / "critic"))
    got = backbone.state_dict()
    assert sorted(f"backbone.{k}" for k in got) == sorted(k for k in trained if k.startswith("backbone."))
    for k, v in got.items():
        assert torch.equal(v, trained[f"backbone.{k}"]), k
    head = load_file(str(fsdp / "critic" / "value_head.safetensors"))
    assert torch.equal(head["linear.weight"], trained["head.linear.weight"])
    assert torch.equal(head["linear.bias"], trained["head.linear.bias"])
    assert head["linear.weight"].abs().sum() > 0  # trained: the head starts at zero


CRITIC_MIXED_PRECISION = r"""
import sys, torch
from alignkit.models.value import load_value_model
from alignkit.training.dist import init_distributed, shutdown
from alignkit.training.fsdp import FSDPModel

model_dir, out = sys.argv[1:3]
d = init_distributed()
torch.manual_seed(0)
critic = load_value_model("policy", model_dir)
torch.nn.init.normal_(critic.head.linear.weight, std=0.5)
ids = torch.randint(3, 60, (2, 7))
mask, pos = torch.ones_like(ids), torch.arange(7).expand(2, 7)
with torch.no_grad():
    want = critic(ids, mask, pos)  # float32, unsharded
# As the trainer shards it on a GPU: bfloat16 gathered weights and compute, float32 shards and reduction
fsdp = FSDPModel(critic, d.device, d.world, param_dtype=torch.bfloat16)
values = critic(ids, mask, pos)
values.sum().backward()
head_grads = [p.grad for p in fsdp.params if p.ndim == 2 and p.shape[0] == 1]
torch.save({"want": want, "got": values.detach(), "dtype": str(values.dtype),
            "head_grad": [g.full_tensor() for g in head_grads]}, f"{out}/mp-{d.rank}.pt")
del fsdp, critic
shutdown()
"""


def test_value_head_stays_float32_under_fsdp_mixed_precision(tiny_model_dir, tmp_path):
    """A separate critic sharded with FSDP's bfloat16 mixed precision (the trainer's GPU setting)
    reads its head in float32: values in float32 close to the unsharded critic's, and the head's
    shards get a gradient (the bfloat16 weights once met float32 hidden states: a dtype error)."""
    script = tmp_path / "critic_mp.py"
    script.write_text(CRITIC_MIXED_PRECISION)
    torchrun(script, tiny_model_dir, tmp_path)
    for r in (0, 1):
        res = torch.load(tmp_path / f"mp-{r}.pt")
        assert res["dtype"] == "torch.float32"
        torch.testing.assert_close(res["got"], res["want"], rtol=0.05, atol=0.05)  # bfloat16 compute
        assert float((res["got"] - res["want"]).abs().max()) > 0  # it did run in bfloat16
        assert len(res["head_grad"]) == 1 and torch.isfinite(res["head_grad"][0]).all()
        assert float(res["head_grad"][0].abs().sum()) > 0


# ------------------------------------------------------------------------------------------ choices


def test_auto_picks_by_size_and_process_count(tiny_model_dir):
    from alignkit.models import load_model

    model = load_model(str(tiny_model_dir))
    n = sum(p.numel() for p in model.parameters())
    cfg = SFTConfig(model="x")
    assert resolve_mode(cfg, 1, model) == "none"
    assert resolve_mode(cfg, 2, model) == "ddp"  # far below 1e9 parameters
    assert resolve_mode(SFTConfig(model="x", fsdp={"auto_min_params": n}), 2, model) == "fsdp"
    assert resolve_mode(SFTConfig(model="x", fsdp={"auto_min_params": n}, peft={"method": "lora"}), 2, model) == "fsdp"
    assert resolve_mode(SFTConfig(model="x", fsdp={"auto_min_params": n}, peft={"method": "prompt"}), 2, model) == "ddp"
    assert resolve_mode(SFTConfig(model="x", distributed="fsdp"), 1, model) == "none"
    with pytest.raises(UserError, match="distributed=none, but 4 processes"):
        resolve_mode(SFTConfig(model="x", distributed="none"), 4, model)


def test_qlora_with_fsdp_is_one_clear_line(tiny_model_dir, sft_data, tmp_path, capsys):
    rc = cli_main(["sft", f"model={tiny_model_dir}", f"data={sft_data}", f"output_dir={tmp_path / 'q'}",
                   "peft.method=qlora", "distributed=fsdp", *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "distributed=fsdp with peft.method=qlora" in err[0], err


# ------------------------------------------------------------------------------------------ activation checkpointing


def _digits(prompts, completions, **cols):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) + 0.1 * (len(t) % 3) for t in completions]


def _run_recipe(name: str, model_dir: Path, data: Path, out: Path, gc: bool) -> None:
    from alignkit import config as C
    from alignkit.recipes import dpo, grpo, online_dpo, ppo, reinforce, rloo, rm, rs, sft

    kw = dict(model=str(model_dir), output_dir=str(out), progress=False, tensorboard=False, plot=False, log_every=1,
              logits_chunk_size=16, lr=3e-3, seed=0, gradient_checkpointing=gc, batch_size=2)
    rl = dict(kw, data=str(data["prompts"]), max_new_tokens=8, kl_coef=0.05)
    if name == "sft":
        sft.train_sft(C.SFTConfig(**kw, data=str(data["chat"]), max_steps=2))
    elif name == "dpo":
        dpo.train_dpo(C.DPOConfig(**kw, data=str(data["pairs"]), max_steps=2))
    elif name == "rm":
        rm.train_rm(C.RMConfig(**kw, data=str(data["pairs"]), max_steps=2, eval_fraction=0))
    elif name == "grpo":
        grpo.train_grpo(C.GRPOConfig(**rl, max_steps=2, num_generations=2, iterations=2), reward_fn=_digits)
    elif name == "rloo":
        rloo.train_rloo(C.RLOOConfig(**rl, max_steps=2, num_generations=2), reward_fn=_digits)
    elif name == "reinforce":
        reinforce.train_reinforce(C.ReinforceConfig(**rl, max_steps=2), reward_fn=_digits)
    elif name == "online_dpo":
        online_dpo.train_online_dpo(C.OnlineDPOConfig(**rl, max_steps=2), reward_fn=_digits)
    elif name == "ppo":
        ppo.train_ppo(C.PPOConfig(**rl, max_steps=2, ppo_epochs=2), reward_fn=_digits)
    elif name == "rs":
        rs.train_rs(C.RSConfig(**rl, rounds=1, sft_steps=2, prompts_per_round=4, num_generations=2),
                    reward_fn=_digits)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> dict:
    from alignkit.toy import world

    d = tmp_path_factory.mktemp("recipes")
    return {"chat": write_jsonl(d / "chat.jsonl", chat_rows(8)),
            "pairs": write_jsonl(d / "pairs.jsonl", world.preference_rows(8, seed=0)),
            "prompts": write_jsonl(d / "prompts.jsonl", world.prompt_rows(16, seed=0))}


@pytest.mark.parametrize("name", ["sft", "dpo", "rm", "grpo", "rloo", "reinforce", "online_dpo", "ppo", "rs"])
def test_gradient_checkpointing_in_every_recipe_changes_nothing_but_memory(name, tiny_model_dir, recipe_data,
                                                                           tmp_path, monkeypatch):
    """gradient_checkpointing=true reaches the trained model's blocks in every recipe, and the run
    (losses, final weights) is the run without it."""
    from alignkit.training.trainer import Trainer

    on_blocks: list[bool] = []
    orig = Trainer.accumulate

    def spy(self, *a, **k):
        on_blocks.append(any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()))
        return orig(self, *a, **k)

    monkeypatch.setattr(Trainer, "accumulate", spy)
    _run_recipe(name, tiny_model_dir, recipe_data, tmp_path / "off", gc=False)
    assert on_blocks and not any(on_blocks)
    on_blocks.clear()
    _run_recipe(name, tiny_model_dir, recipe_data, tmp_path / "on", gc=True)
    assert on_blocks and all(on_blocks)
    ma, mb = train_metrics(tmp_path / "on"), train_metrics(tmp_path / "off")
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), ra["step"]
    assert_same_weights(tmp_path / "on", tmp_path / "off", atol=1e-5)
