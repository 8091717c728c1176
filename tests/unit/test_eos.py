"""End of turn and eos: exactly one trained end token, base models given chat rows, saved models that
stop under plain transformers, reasoning templates, stop strings of many tokens, and generation
without transformers' deprecation warnings.

The tokenizers are built here with the `tokenizers` library in the styles of real model families:
a base model (no chat template; one variant whose post-processor appends `</s>`), a Llama-3 base
checkpoint (eos `<|end_of_text|>`, turns end with `<|eot_id|>`) and a Qwen3-style reasoning template
(earlier `<think>` blocks dropped)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch

from alignkit.data.chat import (
    encode_conversation,
    encode_prompt,
    encode_prompt_completion,
    encode_text,
    setup_chat_template,
    stop_token_ids,
)
from alignkit.data.collate import IGNORE
from alignkit.models import load_tokenizer

from conftest import write_jsonl

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Question: capital of France?\nAnswer: Paris.",
    "What is 2+2? It is 4. And 3+3? It is 6. Two plus two. Three plus three.",
    "user assistant system think reasoning step by step",
    "The quick brown fox jumps over the lazy dog.",
] * 20

# Llama-3 style: bos written by the template (and by the tokenizer's post-processor); every turn
# closes with <|eot_id|>, while a base checkpoint's eos is <|end_of_text|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen3 style: an assistant turn after the last user message shows its reasoning in <think>...</think>
# (empty when it has none); earlier assistant turns are rendered without it.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set body = m.content %}{%- set thought = '' %}"
    "{%- if '</think>' in body %}"
    "{%- set thought = body.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set body = body.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + body + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + body + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_style(kind: str, out: Path, with_model: bool = True, seed: int = 0) -> Path:
    """kind: base | base_addeos | llama3base | qwen3 -> a tokenizer (+ a random 2-layer Llama) in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "base": ["<s>", "</s>", "<unk>"], "base_addeos": ["<s>", "</s>", "<unk>"],
        "llama3base": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"],
        "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    }[kind]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind.startswith("base"):
        tail = " </s>" if kind == "base_addeos" else ""
        tk.post_processor = processors.TemplateProcessing(
            single=f"<s> $A{tail}", pair=f"<s> $A{tail} <s> $B",
            special_tokens=[("<s>", tk.token_to_id("<s>")), ("</s>", tk.token_to_id("</s>"))])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        template = None
    elif kind == "llama3base":
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
        kw = dict(bos_token=bos, eos_token="<|end_of_text|>",
                  additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
        template = LLAMA3_TEMPLATE
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
        template = QWEN3_TEMPLATE
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    if template:
        tok.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    if with_model:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("styles")
    return {k: build_style(k, root / k) for k in
            ("base", "base_addeos", "llama3base", "qwen3")}


def trained_ids(enc) -> list[int]:
    return [t for i, (t, lab) in enumerate(zip(enc.input_ids, enc.labels)) if lab != IGNORE and i > 0]


# ----------------------------------------------------------------------------- 1. one eos, trained once


def test_eos_already_in_data_is_trained_once_on_every_path(styles):
    """A post-processor appending </s> and data ending in "</s>": text, prompt/completion, chat rows
    and preference pairs each hold and train exactly one eos."""
    from alignkit.data.preference import encode_pair

    tok = load_tokenizer(str(styles["base_addeos"]))
    setup_chat_template(tok)
    eos = tok.eos_token_id
    assert tok("hi")["input_ids"][-1] == eos  # the post-processor appends it
    encs = {
        "text": encode_text(tok, "The capital of France is Paris.</s>"),
        "prompt/completion": encode_prompt_completion(tok, "Question: capital of France?\nAnswer:", " Paris.</s>"),
        "completion with newline after eos": encode_prompt_completion(tok, "Q?\nA:", " Paris.</s>\n"),
        "messages": encode_conversation(tok, [{"role": "user", "content": "What is the capital of France?"},
                                              {"role": "assistant", "content": "Paris.</s>"}])[0],
    }
    ce, re_, _ = encode_pair(tok, "Question: capital of France?\nAnswer:", " Paris.</s>", " Lyon.")
    encs["chosen"], encs["rejected"] = ce, re_
    for name, enc in encs.items():
        # the built-in chat template closes the user turn with eos too: one per turn
        assert enc.input_ids.count(eos) == (2 if name == "messages" else 1), (name, tok.convert_ids_to_tokens(enc.input_ids))
        assert trained_ids(enc).count(eos) == 1, name
    assert tok.decode(trained_ids(encs["messages"])) == "Paris.</s>"
    assert tok.decode(trained_ids(encs["prompt/completion"])) == " Paris.</s>"
    assert tok.decode(encs["text"].input_ids) == "<s>The capital of France is Paris.</s>"


def test_sft_loader_trains_one_eos_for_text_rows(styles, tmp_path):
    from alignkit.data.sft import load_sft_data

    tok = load_tokenizer(str(styles["base_addeos"]))
    for row in ({"text": "The capital of France is Paris.</s>"},
                {"prompt": "Q: capital of France?\nA:", "completion": " Paris.</s>"}):
        path = write_jsonl(tmp_path / "t.jsonl", [row])
        rows, _ = load_sft_data(str(path), "train", tok, 128)
        assert trained_ids(rows[0]).count(tok.eos_token_id) == 1, row


# ------------------------------------------------------------------- 2. a base model given chat rows


def _sft(model_dir: Path, rows: list[dict], out: Path, steps: int = 40) -> Path:
    from alignkit.config import SFTConfig, load_config
    from alignkit.recipes.sft import train_sft

    data = write_jsonl(out.parent / f"{out.name}.jsonl", rows)
    cfg = load_config(SFTConfig, None, [f"model={model_dir}", f"data={data}", f"output_dir={out}",
                                        f"max_steps={steps}", "batch_size=4", "lr=1e-2", "warmup_steps=0",
                                        "progress=false", "plot=false", "schedule=constant"])
    train_sft(cfg)
    return out


def test_base_model_given_chat_rows_learns_to_stop(styles, tmp_path, capsys):
    """No chat template: the built-in template ends each assistant turn with the tokenizer's eos, so
    a model overfit on one answer stops after it (the rollout engine and plain generate agree)."""
    from transformers import AutoModelForCausalLM

    from alignkit.rollout.engine import RolloutEngine, SamplingParams

    tok = load_tokenizer(str(styles["base"]))
    assert not tok.chat_template
    note = setup_chat_template(tok)
    assert note and "'</s>'" in note
    msgs = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    enc = encode_conversation(tok, msgs)[0]
    assert tok.decode(trained_ids(enc)) == "Paris.</s>"

    out = _sft(styles["base"], [{"messages": msgs}] * 8, tmp_path / "base_sft")
    assert "built-in ChatML-style template, assistant turns end with '</s>'" in capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = load_tokenizer(str(out))
    prompt = msgs[:1]
    res = RolloutEngine(tok).generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=30))
    s = res.samples[0]
    assert s.finish_reason == "eos" and s.text == "Paris.", (s.finish_reason, s.text)
    ids = torch.tensor([encode_prompt(tok, prompt)])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30)
    new = gen[0, ids.shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id and tok.decode(new, skip_special_tokens=True) == "Paris."


# ----------------------------------------------------- 3. saved models stop under plain transformers


def test_stop_token_ids_put_end_of_turn_first(styles):
    tok = load_tokenizer(str(styles["llama3base"]))
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert tok.eos_token_id == eos
    assert stop_token_ids(tok)[:2] == [eot, eos]


def test_saved_sft_model_stops_under_plain_generate(styles, tmp_path):
    """Llama-3 base style: turns end with <|eot_id|>, eos is <|end_of_text|>. The saved
    generation_config.json lists both, end of turn first, and plain generate() stops after the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    msgs = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    out = _sft(styles["llama3base"], [{"messages": msgs}] * 8, tmp_path / "l3_sft")
    tok = AutoTokenizer.from_pretrained(out)
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, do_sample=False, max_new_tokens=30)
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    assert len(new) < 30 and new[-1] == eot, tok.convert_ids_to_tokens(new)
    assert tok.decode(new, skip_special_tokens=True) == "Paris."
    gc = json.loads((out / "generation_config.json").read_text())
    assert gc["eos_token_id"][:2] == [eot, eos]
    # every checkpoint is a saved model too
    for ck in (out / "checkpoints").glob("step-*"):
        assert json.loads((ck / "generation_config.json").read_text())["eos_token_id"][:2] == [eot, eos]


def test_merged_model_lists_end_of_turn_and_eos(styles, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.models.peft import MergeConfig, merge_adapter

    base = styles["llama3base"]
    tok = load_tokenizer(str(base))
    adapter = tmp_path / "adapter"
    with warnings.catch_warnings():  # peft's own call of a deprecated transformers name
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    out = merge_adapter(MergeConfig(adapter=str(adapter), output=str(tmp_path / "merged"), base=str(base)),
                        log=lambda s: None)
    gc = json.loads((Path(out) / "generation_config.json").read_text())
    assert gc["eos_token_id"][:2] == [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id]


# ----------------------------------------------------------------------- 4. reasoning templates


MULTI = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\nIt is 6."},
]


def test_reasoning_template_last_turn_is_one_row_with_generation_context(styles):
    tok = load_tokenizer(str(styles["qwen3"]))
    enc = encode_prompt_completion(tok, MULTI[:3], MULTI[3:])
    ctx = encode_prompt(tok, MULTI[:3])  # what the model is given at generation time
    assert enc.input_ids[: len(ctx)] == ctx and all(lab == IGNORE for lab in enc.labels[: len(ctx)])
    assert tok.decode(trained_ids(enc)) == "<think>\nThree plus three.\n</think>\n\nIt is 6.<|im_end|>"
    assert "Two plus two" not in tok.decode(enc.input_ids)  # the template drops earlier reasoning


def test_reasoning_template_all_turns_one_row_per_turn(styles, tmp_path):
    """messages rows: each assistant turn is trained in its own row, with its own generation context."""
    from alignkit.data.sft import load_sft_data

    tok = load_tokenizer(str(styles["qwen3"]))
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": MULTI}])
    rows, stats = load_sft_data(str(path), "train", tok, 256)
    assert len(rows) == 2 and stats.kept == 1 and stats.split_rows == 1 and stats.training_rows == 2
    assert "one assistant turn per row" in stats.summary()
    for enc, k, want in ((rows[0], 1, "<think>\nTwo plus two.\n</think>\n\nIt is 4.<|im_end|>"),
                         (rows[1], 3, "<think>\nThree plus three.\n</think>\n\nIt is 6.<|im_end|>")):
        ctx = encode_prompt(tok, MULTI[:k])
        assert enc.input_ids[: len(ctx)] == ctx
        assert tok.decode(trained_ids(enc)) == want


def test_inspect_shows_reasoning_rows(styles, tmp_path):
    from alignkit.data.inspect import InspectConfig, inspect_data

    buf = io.StringIO()
    for name, row in (("m", {"messages": MULTI}), ("pc", {"prompt": MULTI[:3], "completion": MULTI[3:]})):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        inspect_data(InspectConfig(data=str(path), model=str(styles["qwen3"]), rows=1, color=False), out=buf)
    text = buf.getvalue()
    assert "row 1 (messages, training row 1 of 2)" in text and "row 1 (messages, training row 2 of 2)" in text
    assert "=== row 1 (prompt_completion):" in text
    trained = [ln for ln in text.splitlines() if ln.startswith("--- trained text")]
    assert len(trained) == 3 and "Two plus two" in trained[0] and "Three plus three" in trained[2]


# ----------------------------------------------------------------- 5. stop strings of many tokens


class _Scripted(torch.nn.Module):
    """A real tiny model whose logits are overridden to emit a fixed token sequence, so the engine's
    stop logic is tested on exact tokens (cache, batching and all)."""

    def __init__(self, inner, script: list[int]):
        super().__init__()
        self.inner, self.script, self.config = inner, script, inner.config

    def forward(self, **kw):
        out = self.inner(**kw)
        step = 0 if kw["input_ids"].shape[1] > 1 else self._step + 1
        self._step = step
        logits = torch.full_like(out.logits, -1e4)
        logits[..., self.script[min(step, len(self.script) - 1)]] = 0.0
        out.logits = logits
        return out


@pytest.mark.parametrize("stop", ["🙂🙂🙂", "停止生成了", "。\n\n"])
def test_stop_string_of_many_tokens_cuts_where_it_appears(tiny_model_dir, stop):
    from alignkit.models import load_model
    from alignkit.rollout.engine import RolloutEngine, SamplingParams

    tok = load_tokenizer(str(tiny_model_dir))
    before, after = "The answer 4", " and more text after it"
    script = tok(before + stop + after, add_special_tokens=False)["input_ids"]
    n_stop = len(tok(stop, add_special_tokens=False)["input_ids"])
    assert stop != "🙂🙂🙂" or n_stop > len(stop) + 8  # longer in tokens than the old look-back window
    model = _Scripted(load_model(str(tiny_model_dir)), script)
    res = RolloutEngine(tok).generate(model, [[{"role": "user", "content": "2"}]],
                                      SamplingParams(temperature=0, max_new_tokens=len(script) + 5, stop=(stop,)))
    s = res.samples[0]
    assert s.finish_reason == "stop" and s.text == before
    assert tok.decode(s.completion_ids).endswith(stop)  # generation ended at the token completing it


# ------------------------------------------------------------------ 6. no deprecation noise


def test_generation_and_checkpointing_emit_no_future_warning(tiny_model_dir):
    from alignkit.eval.generate import generate_texts
    from alignkit.models import load_model
    from alignkit.models.generation import enable_activation_checkpointing
    from alignkit.rollout.engine import RolloutEngine, SamplingParams

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RolloutEngine(tok).generate(model, [[{"role": "user", "content": "2"}], "The quick"],
                                    SamplingParams(n=2, max_new_tokens=6))
        generate_texts(model, tok, [[{"role": "user", "content": "2"}]], max_new_tokens=6)
        enable_activation_checkpointing(model)
    bad = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, bad
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_every_save_writes_stop_ids_for_generators_only(styles, tmp_path):
    """alignkit.models.save_pretrained (the path every recipe's checkpoints and final model take):
    a causal LM, bare or under a LoRA adapter, gets the stop list; a reward model (no generation) none."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.models import save_pretrained

    src = styles["llama3base"]
    tok = load_tokenizer(str(src))
    want = [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id]
    lm = AutoModelForCausalLM.from_pretrained(src)
    save_pretrained(lm, tok, tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "generation_config.json").read_text())["eos_token_id"][:2] == want
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    save_pretrained(pm, tok, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "generation_config.json").read_text())["eos_token_id"][:2] == want
    rm = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    save_pretrained(rm, tok, tmp_path / "rm")
    assert not (tmp_path / "rm" / "generation_config.json").exists()


def test_stop_strings_apply_under_prompt_learning_adapters(tiny_model_dir):
    """Prompt/prefix tuning generate through peft's generate; stop strings cut there too."""
    from peft import PromptTuningConfig, get_peft_model

    from alignkit.models import load_model
    from alignkit.rollout.engine import RolloutEngine, SamplingParams

    tok = load_tokenizer(str(tiny_model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(load_model(str(tiny_model_dir)),
                               PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    eng = RolloutEngine(tok)
    prompt = [[{"role": "user", "content": "The quick brown fox"}]]
    full = eng.generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=16)).samples[0]
    assert full.finish_reason == "length" and len(full.text) > 6, full
    stop = full.text[3:6]
    s = eng.generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=16, stop=(stop,))).samples[0]
    assert s.finish_reason == "stop" and s.text == full.text[: full.text.find(stop)]
    assert len(s.completion_ids) == len(s.logprobs) < len(full.completion_ids)


def test_template_whose_turn_end_is_not_a_token_is_reported(styles, tmp_path):
    """A ChatML template on a base tokenizer (no <|im_end|> token): the answers would train the marker
    as characters and never the stop token; the data summary says so."""
    from alignkit.data.sft import load_sft_data

    tok = load_tokenizer(str(styles["base"]))
    setup_chat_template(tok, "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                             "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                             "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}] * 3)
    _, stats = load_sft_data(str(path), "train", tok, 128)
    assert stats.no_stop == 3 and "3 rows train no end-of-turn/eos token" in stats.summary()
    tok.chat_template = None
    setup_chat_template(tok, None)  # the built-in template ends turns with eos: nothing to report
    _, stats = load_sft_data(str(path), "train", tok, 128)
    assert stats.no_stop == 0 and "WARNING" not in stats.summary()
