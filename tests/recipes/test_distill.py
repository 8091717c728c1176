"""On-policy distillation (`alignkit distill`, issue 17): a student sampling, a teacher scoring
every token. The teacher here is the tiny student SFT-trained to answer every prompt with "42";
the student starts at 0 exact accuracy and reaches the teacher's by distillation alone."""

from __future__ import annotations

import math

import pytest
import torch

import test_resume as resume_helpers
from alignkit.cli import main
from alignkit.config import DistillConfig, SFTConfig
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes.distill import on_policy_step, train_distill
from alignkit.recipes.sft import train_sft
from alignkit.rollout.engine import RolloutEngine, SamplingParams
from alignkit.training.trainer import Trainer

from conftest import build_tiny_model, build_tiny_tokenizer, metrics, write_jsonl

pytestmark = pytest.mark.usefixtures("no_curve_plots")

ANSWER = "42"
QUESTIONS = [f"Сколько будет {i} плюс {i}?" for i in range(64)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(student folder, teacher folder, prompt file with answers): the teacher is the student after
    40 SFT steps on "42" (greedy exact accuracy 1.0; the student's is 0)."""
    root = tmp_path_factory.mktemp("distill")
    student = root / "student"
    tok = build_tiny_tokenizer(student)
    build_tiny_model(student, len(tok))
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": [{"role": "user", "content": q}],
                                            "completion": [{"role": "assistant", "content": ANSWER}]}
                                           for q in QUESTIONS])
    train_sft(SFTConfig(model=str(student), data=str(sft), output_dir=str(root / "teacher"), max_steps=40,
                        batch_size=8, lr=1e-2, progress=False, log_every=10, tensorboard=False))
    prompts = write_jsonl(root / "p.jsonl", [{"prompt": q, "answer": ANSWER, "completion": ANSWER}
                                             for q in QUESTIONS])
    return student, root / "teacher", prompts


def exact(prompts, completions, answer, **cols):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def accuracy(folder) -> float:
    tok, model = load_tokenizer(str(folder)), load_model(str(folder))
    batch = RolloutEngine(tok).generate(model, [[{"role": "user", "content": q}] for q in QUESTIONS[:32]],
                                        SamplingParams(n=1, max_new_tokens=6, temperature=0.0))
    return sum(s.text.strip() == ANSWER for s in batch.samples) / len(batch.samples)


def cfg(setup, out, **kw) -> DistillConfig:
    student, teacher, prompts = setup
    base = dict(model=str(student), teacher=str(teacher), data=str(prompts), output_dir=str(out), batch_size=8,
                num_generations=2, max_new_tokens=6, lr=1e-2, progress=False, log_every=1, tensorboard=False)
    return DistillConfig(**{**base, **kw})


def test_reverse_kl_distillation_raises_exact_accuracy(setup, tmp_path):
    student, teacher, _ = setup
    assert accuracy(teacher) == 1.0 and accuracy(student) == 0.0
    out = tmp_path / "d"
    train_distill(cfg(setup, out, max_steps=120), reward_fn=exact)
    rec = metrics(out)
    kl = [r["kl"] for r in rec]
    assert all(math.isfinite(x) for x in kl)
    assert sum(kl[-10:]) / 10 < 0.5 * sum(kl[:10]) / 10, (kl[:10], kl[-10:])  # the KL to the teacher drops
    assert accuracy(out) >= 0.9


def test_jsd_with_dataset_answers_mixed_in(setup, tmp_path):
    """loss=jsd, lmbda=0.5: some steps train on the student's samples, the others on the data's
    answers; the full-vocabulary divergence falls."""
    out = tmp_path / "j"
    train_distill(cfg(setup, out, max_steps=30, loss="jsd", beta=0.5, lmbda=0.5), reward_fn=exact)
    rec = metrics(out)
    flags = [r["on_policy"] for r in rec]
    assert flags == [float(on_policy_step(cfg(setup, out, lmbda=0.5), i)) for i in range(30)]
    assert 0 < sum(flags) < 30
    div = [r["divergence"] for r in rec]
    assert all(math.isfinite(x) for x in div) and sum(div[-5:]) < 0.5 * sum(div[:5])


def test_lora_student_trains_only_its_adapter(setup, tmp_path):
    out = tmp_path / "l"
    train_distill(cfg(setup, out, max_steps=3, peft={"method": "lora", "r": 4}), reward_fn=exact)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert all(math.isfinite(r["kl"]) for r in metrics(out))


def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    student, teacher, prompts = setup
    other = tmp_path / "other"
    tok = build_tiny_tokenizer(other, vocab_size=280)  # another tokenizer: ids mean other strings
    build_tiny_model(other, len(tok))
    no_answers = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS])
    cases = [
        ([f"teacher={other}"], "different vocabulary"),
        ([f"teacher={teacher}", f"data={no_answers}", "lmbda=0.5"], "no 'completion' column"),
        ([], "distill needs a teacher"),
        ([f"teacher={teacher}", "overlong_buffer=2"], "distill trains on none"),
    ]
    for extra, needle in cases:
        out = tmp_path / "bad"
        args = ["distill", f"model={student}", f"data={prompts}", f"output_dir={out}", "progress=false",
                "max_new_tokens=6", *extra]
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (extra, err)
        assert needle in err and len(err.splitlines()) == 1, err
        assert not out.exists(), extra


def test_cli_distill_end_to_end(setup, tmp_path, capsys):
    student, teacher, prompts = setup
    out = tmp_path / "c"
    code = main(["distill", f"model={student}", f"teacher={teacher}", f"data={prompts}", f"output_dir={out}",
                 "max_steps=2", "batch_size=4", "max_new_tokens=6", "progress=false", "loss=jsd", "beta=0.1",
                 "log_every=1"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors").exists() and len(metrics(out)) == 2


def test_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    """Killed inside optimizer step 3 of 4, resumed: weights bitwise equal, every record once."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    kw = dict(max_steps=4, batch_size=2, save_every=1, lmbda=0.5, lr=3e-3, seed=1)
    train_distill(cfg(setup, full, **kw), reward_fn=exact)

    real = Trainer.optimizer_step

    def dying(self, m):
        if self.step == 2:
            raise resume_helpers.Killed("stopped inside optimizer step 3")
        return real(self, m)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", dying)
        with pytest.raises(resume_helpers.Killed):
            train_distill(cfg(setup, stopped, **kw), reward_fn=exact)
    train_distill(cfg(setup, stopped, resume=True, **kw), reward_fn=exact)
    a, b = resume_helpers.weights(full), resume_helpers.weights(stopped)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = resume_helpers.train_records(full), resume_helpers.train_records(stopped)
    assert [r["optimizer_step"] for r in rb] == [1, 2, 3, 4]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
