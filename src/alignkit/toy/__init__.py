"""The embedded default: a toy task world and a tiny base model built offline.

The task: add up a short list of expenses and answer ``Итого: <total> рублей.`` (see
`alignkit.toy.world` for the generators and the reward rule, `alignkit.toy.tokenizer` for the
tokenizer, `alignkit.toy.model` for the base model, and docs/toy.md).

The two functions here back the CLI commands `alignkit toy data` and `alignkit toy model`.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.errors import UserError

DATA_KINDS = ("sft", "sft-tools", "preference", "prompts", "pretrain")


def _difficulty(name: str):
    from alignkit.toy import world

    if name not in world.DIFFICULTIES:
        raise UserError(f"difficulty={name!r}: unknown preset; choose one of {', '.join(world.DIFFICULTIES)}")
    return world.DIFFICULTIES[name]


def toy_data(kind: str, n: int, output: str, seed: int = 0, split: str = "train", difficulty: str = "default",
             call_rate: float = 1.0) -> Path:
    """Write `n` rows of the toy task as JSONL to `output` and return its path.

    kind: sft (chat demonstrations), sft-tools (transcripts calling the calculator), preference (chosen/rejected pairs), prompts (prompts with the
    reference answer and total), pretrain (plain `text` documents). split: train or eval (never
    sharing a task). call_rate: of sft-tools, the share of transcripts that call the calculator
    (the rest answer at once)."""
    from alignkit.toy import world

    if kind not in DATA_KINDS:
        raise UserError(f"kind={kind!r}: unknown toy data kind; choose one of {', '.join(DATA_KINDS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"n={n!r}: the number of rows must be a positive integer")
    if split not in world.SPLITS:
        raise UserError(f"split={split!r}: choose 'train' or 'eval'")
    if not output:
        raise UserError("output: give the path of the JSONL file to write")
    d = _difficulty(difficulty)
    make = {
        "sft": world.sft_rows,
        "sft-tools": world.sft_tools_rows,
        "preference": world.preference_rows,
        "prompts": world.prompt_rows,
        "pretrain": world.pretrain_texts,
    }[kind]
    if call_rate != 1.0 and kind != "sft-tools":
        raise UserError(f"call_rate={call_rate}: only kind=sft-tools has tool calls")
    if not 0.0 <= call_rate <= 1.0:
        raise UserError(f"call_rate={call_rate}: give a share in [0, 1]")
    extra = {"call_rate": call_rate} if kind == "sft-tools" else {}
    rows = make(n, seed=seed, difficulty=d, split=split, **extra)
    out = Path(output).expanduser()
    if out.is_dir():
        raise UserError(f"output={output}: is a folder; give a file path such as {out / (kind + '.jsonl')}")
    try:
        return world.write_jsonl(rows, out)
    except OSError as e:
        raise UserError(f"output={output}: cannot write ({e.strerror or e})") from None


def toy_model(output: str | None = None, seed: int = 0, preset: str = "default") -> Path:
    """Build (or reuse from the cache) the tiny pretrained base model; return its folder
    (`output` when given: the model is copied there)."""
    from alignkit.toy import model

    if preset not in model.PRESETS:
        raise UserError(f"preset={preset!r}: unknown toy model preset; choose one of {', '.join(model.PRESETS)}")
    if output is not None:
        out = Path(output).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"output={output}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
            raise UserError(f"output={output}: a non-empty folder that does not hold a model; choose another path")
    return model.build_base_model(output_dir=output, seed=seed, preset=preset)


__all__ = ["toy_data", "toy_model", "DATA_KINDS"]
