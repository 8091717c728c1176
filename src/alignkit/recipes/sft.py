"""Supervised fine-tuning.

    maximise  sum over answer tokens a_t of  log p(a_t | prompt, a_<t)

Only answer tokens (assistant turns, completions; every token for plain `text`) carry loss: the
prompt is context, not something to imitate. The loss of a step is the summed negative
log-likelihood over the trained tokens of the whole global batch divided by their number
(token mean over the global batch; see `alignkit.training.trainer`).
"""

from __future__ import annotations

from alignkit.config import SFTConfig
from alignkit.data.chat import setup_chat_template
from alignkit.data.collate import IGNORE, n_trained, pack_collate, pad_collate
from alignkit.data.sft import load_sft_data
from alignkit.eval.metrics import eval_nll
from alignkit.models import load_tokenizer
from alignkit.models.peft import load_base_model, prepare_trainable
from alignkit.ops.logprobs import causal_lm_token_logps
from alignkit.training.dist import init_distributed
from alignkit.training.loop import run_offline, steps_for
from alignkit.training.trainer import Trainer, seed_everything

__all__ = ["SFTConfig", "train_sft", "sft_loss_fn"]


def sft_loss_fn(chunk_size: int):
    """loss_fn(model, mb) -> (summed NLL of the trained tokens (targets != -100), {}); loss units:
    trained tokens. Log-probs in chunks of `chunk_size` positions."""
    def loss_fn(model, mb: dict):
        logps = causal_lm_token_logps(
            model, mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
            targets=mb["targets"], chunk_size=chunk_size,
        )
        mask = mb["targets"] != IGNORE
        return -(logps * mask).sum(), {}

    return loss_fn




def train_sft(cfg: SFTConfig, model=None, tokenizer=None) -> dict:
    """Run SFT as configured; returns the final evaluation metrics (empty without eval_data).

    `model` / `tokenizer` may be passed in (already loaded, e.g. wrapped with an adapter)."""
    dist = init_distributed()
    seed_everything(cfg.seed)
    tok = tokenizer or load_tokenizer(cfg.model)
    from alignkit.rollout.agents import resolve_chat_template

    template_note = setup_chat_template(tok, resolve_chat_template(cfg.chat_template))
    rows, stats = load_sft_data(cfg.data, cfg.data_split, tok, cfg.max_length, cfg.truncation, cfg.train_on_prompt)
    eval_rows = None
    if cfg.eval_data:
        eval_rows, _ = load_sft_data(cfg.eval_data, cfg.eval_split, tok, cfg.max_length, cfg.truncation,
                                     cfg.train_on_prompt, what="eval_data")
    if model is None:
        model = load_base_model(cfg)
    model = prepare_trainable(model, cfg)  # adapters (peft.*) or partial freezing
    if hasattr(model, "config"):
        model.config.use_cache = False
    total_steps = steps_for(cfg, len(rows), dist.world)
    trainer = Trainer(cfg, model, tok, recipe="sft", total_steps=total_steps, dist_info=dist)
    if template_note:
        trainer.info(template_note)
    trainer.info(f"data: {cfg.data}: {stats.summary()}")
    def make_batch(idx, source=rows):
        picked = [source[i] for i in idx]
        return pack_collate(picked) if cfg.packing else pad_collate(picked, tok.pad_token_id)

    eval_fn = None
    if eval_rows is not None:
        def eval_fn():
            return eval_nll(trainer.model, eval_rows, lambda idx: make_batch(idx, eval_rows), cfg.batch_size,
                            cfg.logits_chunk_size, dist, trainer.autocast)

    return run_offline(trainer, len(rows), make_batch, sft_loss_fn(cfg.logits_chunk_size), n_trained,
                       eval_fn=eval_fn)
