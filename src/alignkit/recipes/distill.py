"""On-policy distillation: a student learns from a teacher on its own samples.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD, arXiv:2306.13649); Gu et al. 2024 (MiniLLM) for the reverse KL. Every rollout step:

    with probability lmbda (seeded per step, the same on every process):
        on-policy:  sample y ~ π_student(·|x) for this step's prompts x (num_generations each)
    otherwise:
        off-policy: y = the data's answer to x (`completion_column`)
    the teacher scores every token y_t of y (no gradient), then one optimizer step on

        loss=reverse_kl   l_t = KL(π_s(·|x, y_<t) ‖ π_t(·|x, y_<t))
                          on-policy: the sampled-token estimator d_t·∇log π_s(y_t),
                          d_t = log π_s(y_t) − log π_t(y_t) (`losses.distill_reverse_kl_sampled`);
                          off-policy (the answer is not the student's sample): the exact
                          full-vocabulary reverse KL (JSD with β = 1)
        loss=jsd          l_t = JSD_β(π_t ‖ π_s) over the full vocabulary
                          (`losses.chunked_distill_divergence`: chunks of tokens, never all the
                          (tokens × vocab) logits at once)

aggregated as a token mean over the whole global batch (all micro-batches and processes). Log-probs
and logits are taken at the sampling `temperature` for both models (1 for greedy-free defaults).
The teacher must share the student's tokenizer (`models.compat.check_same_vocabulary`: a
different vocabulary is one line and exit 2, before anything is written). With an adapter
(`peft.method=lora`) only the student's adapter trains; the teacher is a separate frozen model,
sharded like a reference model under FSDP. See docs/distill.md.
"""

from __future__ import annotations

import contextlib

import torch

from alignkit.config import DistillConfig
from alignkit.data.chat import encode_prompt_completion
from alignkit.data.order import seeded_generator
from alignkit.data.prompts import load_prompts
from alignkit.errors import UserError
from alignkit.losses import chunked_distill_divergence, distill_reverse_kl_sampled
from alignkit.ops.logprobs import split_causal_lm
from alignkit.recipes import online as ol
from alignkit.rollout.engine import RolloutBatch, Sample
from alignkit.training.loop import StepClock, StepResult

__all__ = ["DistillConfig", "train_distill", "distill_loss_fn", "on_policy_step", "dataset_samples"]


def on_policy_step(cfg: DistillConfig, rstep: int) -> bool:
    """Whether rollout step `rstep` trains on the student's samples (probability `lmbda`, seeded by
    the step alone, so every process and a resumed run draw the same)."""
    if cfg.lmbda >= 1.0:
        return True
    if cfg.lmbda <= 0.0:
        return False
    u = torch.rand((), generator=seeded_generator(cfg.seed, rstep, 977))
    return bool(u < cfg.lmbda)


def dataset_samples(tok, prompts: list, answers: list, max_new_tokens: int, where: str) -> list[Sample]:
    """One `Sample` per prompt holding the data's answer as the completion: the prompt's tokens as
    the rollout engine encodes them, then the answer's assistant tokens with their end-of-turn
    token, cut at `max_new_tokens`. Raises UserError for an answer that is not non-empty text."""
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if not isinstance(a, str) or not a.strip():
            raise UserError(f"{where}: prompt {i} of this step has no text answer ({type(a).__name__}); lmbda < 1 "
                            "trains on the data's answers, so give every row one or set lmbda=1")
        comp = [{"role": "assistant", "content": a}] if isinstance(p, list) else a
        enc = encode_prompt_completion(tok, p, comp)
        trained = [t for t, lab in enumerate(enc.labels) if lab != -100]
        first, last = trained[0], trained[-1]
        ids = enc.input_ids[first:last + 1][:max_new_tokens]
        out.append(Sample(prompt_index=i, prompt_ids=enc.input_ids[:first], completion_ids=ids,
                          logprobs=[0.0] * len(ids), text=a, finish_reason="eos"))
    return out


def _logits_source(model, mb: dict, vocab: int):
    """(hidden (B, T, H), head: hidden -> logits (..., vocab)) of a causal LM on the micro-batch:
    the decoder's last hidden state and the model's own head when it can be split
    (`ops.logprobs.split_causal_lm`), else the full logits and the identity. Only the first
    `vocab` logits are kept (output layers padded past the tokenizer)."""
    parts = split_causal_lm(model)
    if parts is not None:
        decoder, head, transform = parts
        out = decoder(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                      position_ids=mb["position_ids"], use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

        def fn(h):
            z = head(h)
            return (z if transform is None else transform(z))[..., :vocab]

        return hidden, fn
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
    return logits[:, -mb["input_ids"].shape[1]:], (lambda z: z[..., :vocab])


def distill_loss_fn(cfg: DistillConfig, teacher, teacher_context, vocab: int):
    """loss_fn(student, mb) -> (summed per-token divergence over the micro-batch's answer tokens,
    metrics); loss units: answer tokens. mb: rollout rows with `on_policy` (bool) and, on the
    sampled-token path, `teacher_logps` (B, T). `teacher_context()` is entered around the teacher's
    forward (FSDP gathering)."""
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0

    def loss_fn(model, mb: dict):
        m = mb["completion_mask"]
        if cfg.loss == "reverse_kl" and mb["on_policy"]:
            logps = ol.token_logps(model, mb, cfg.temperature, cfg.logits_chunk_size)
            loss_sum, n = distill_reverse_kl_sampled(logps, mb["teacher_logps"], m)
            return loss_sum, {"kl": (loss_sum.detach(), n),
                              "teacher_logp": ((mb["teacher_logps"] * m).sum(), m.sum())}
        beta = 1.0 if cfg.loss == "reverse_kl" else cfg.beta
        hs, head_s = _logits_source(model, mb, vocab)
        with torch.no_grad(), teacher_context():
            ht, head_t = _logits_source(teacher, mb, vocab)
            # the teacher's logits are built chunk by chunk inside the divergence, from its hidden
            # states: keep them as plain tensors outside any autograd graph
            ht = ht.detach()
        loss_sum, n = chunked_distill_divergence(hs, head_s, ht, head_t, m, beta, temperature,
                                                 cfg.logits_chunk_size)
        return loss_sum, {"divergence": (loss_sum.detach(), n)}

    return loss_fn


def train_distill(cfg: DistillConfig, model=None, tokenizer=None, teacher=None, reward_fn=None) -> dict:
    """Distil `cfg.teacher` (or the `teacher` model passed in) into the student `cfg.model`.
    `reward_fn(prompts, completions, **columns)` (or cfg.reward) is optional: it only logs
    reward_mean and scores eval_data. `max_steps` counts rollout steps, one optimizer step each.
    Returns the last held-out evaluation (empty without eval_data and a reward).
    Raises UserError (before the run folder is made) for a missing teacher, a teacher whose
    vocabulary differs from the student's, and lmbda < 1 on data without answers."""
    from alignkit.models import load_tokenizer
    from alignkit.models.compat import check_same_vocabulary

    if not cfg.teacher and teacher is None:
        raise UserError("distill needs a teacher: pass teacher=FOLDER (a model sharing the student's tokenizer)")
    student_tok = tokenizer or load_tokenizer(cfg.model)
    teacher_name = cfg.teacher or "(passed in)"
    if cfg.teacher:  # tokenizers first: cheap, and refused before any model loads
        check_same_vocabulary(student_tok, load_tokenizer(cfg.teacher), cfg.model or "(passed in)", teacher_name)
    if cfg.lmbda < 1.0:  # checked before any model loads
        answers = load_prompts(cfg.data, cfg.data_split, cfg.prompt_column, cfg.chat_prompts).columns.get(cfg.completion_column)
        if answers is None:
            raise UserError(f"{cfg.data}: no '{cfg.completion_column}' column; lmbda < 1 trains on the data's "
                            "answers, so add them (or set completion_column=..., or lmbda=1)")
        bad = next((i for i, a in enumerate(answers) if not isinstance(a, str) or not a.strip()), None)
        if bad is not None:
            raise UserError(f"{cfg.data}: row {bad + 1}: '{cfg.completion_column}' is not a non-empty text answer; "
                            "lmbda < 1 trains on the data's answers, so give every row one (or set lmbda=1)")
    scoreless = reward_fn is None and cfg.reward is None
    if reward_fn is None:
        if cfg.reward is not None:
            from alignkit.rewards import build_reward

            reward_fn = build_reward(cfg.reward, tokenizer=student_tok)
        else:
            def reward_fn(prompts, completions, **columns):  # nothing scores: reward_missing counts them
                return [None] * len(completions)
    run_cfg = cfg.model_copy(update={"ref_model": cfg.teacher or cfg.model})
    run = ol.OnlineRun(run_cfg, "distill", model, student_tok, reward_fn=reward_fn,
                       need_reference=teacher is None)
    if teacher is not None:
        run.ref = teacher.to(run.dist.device).eval().requires_grad_(False)
    if run.ref is run.trainer.model:
        raise UserError("distill: the teacher is the student itself; pass teacher=FOLDER")
    vocab = check_same_vocabulary(student_tok, student_tok, cfg.model or "(passed in)", teacher_name,
                                  student_model=run.trainer.model, teacher_model=run.ref)
    if scoreless and run.eval_prompts is not None:
        tr_info = "eval_data is ignored: without a reward (reward=...) there is nothing to score its answers with"
        run.trainer.info(tr_info)
        run.eval_prompts = None
    tr, G = run.trainer, cfg.num_generations

    def teacher_context():
        return run.ref_fsdp.gathered() if run.ref_fsdp is not None else contextlib.nullcontext()

    loss_fn = distill_loss_fn(cfg, run.ref, teacher_context, vocab)

    def units(mb: dict) -> float:
        return float(mb["completion_mask"].sum())

    def step(rstep: int, clock: StepClock) -> StepResult:
        prompts, columns = run.prompts_for(rstep)
        on = on_policy_step(cfg, rstep)
        if on:  # the student's own answers, G per prompt
            rollout = run.collect(rstep, prompts, columns, clock)
            info = ol.rollout_metrics(rollout)
            source, rows_per_mb, generated = rollout, cfg.batch_size * G, rollout.generated_tokens
        else:  # the data's answers, one per prompt
            samples = dataset_samples(run.tok, prompts, columns[cfg.completion_column], cfg.max_new_tokens,
                                      cfg.data)
            source, rows_per_mb, generated, rollout = RolloutBatch(samples, 1), cfg.batch_size, 0, None
            info = {"response_len": sum(len(s.completion_ids) for s in samples) / max(len(samples), 1)}
        info["on_policy"] = float(on)
        mbs = ol.row_batches(source, rows_per_mb, cfg.grad_accum, run.pad_id, {})
        for mb in mbs:
            mb["on_policy"] = on
        if cfg.loss == "reverse_kl" and on:  # the teacher's log-prob of every sampled token
            run.add_ref_logps(mbs)
            for mb in mbs:
                mb["teacher_logps"] = mb.pop("ref_logps")
        clock.lap("prepare")
        metrics = tr.accumulate(mbs, loss_fn, units)
        metrics.update(info)
        return StepResult([tr.optimizer_step(metrics)], rollout, generated)

    return run.loop(step)
