"""Configs and entry points of `alignkit toy data` and `alignkit toy model`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignkit.config import Section


class ToyDataConfig(Section):
    """Write rows of the toy expenses task as JSONL."""

    kind: Literal["sft", "sft-tools", "preference", "prompts", "pretrain"] = Field(
        "sft", description="sft: chat demonstrations; sft-tools: transcripts that call the calculator; preference: chosen/rejected pairs; "
        "prompts: prompts with the reference answer; pretrain: plain text for the base model"
    )
    n: int = Field(1000, ge=1, description="Number of rows")
    output: str = Field("toy.jsonl", description="Output JSONL path")
    seed: int = Field(0, description="Generator seed")
    split: Literal["train", "eval"] = Field("train", description="train or eval (disjoint prompt streams)")
    difficulty: str = Field("default", description="Difficulty preset (items per list, size of numbers)")
    call_rate: float = Field(1.0, ge=0.0, le=1.0, description="sft-tools only: share of transcripts that call the "
                             "calculator; the rest answer at once (the tool still offered)")


class ToyModelConfig(Section):
    """Build (or reuse from the cache) the tiny pretrained base model of the toy task."""

    output: str | None = Field(None, description="Also copy the model to this folder")
    seed: int = Field(0, description="Build seed")
    preset: str = Field("default", description="Model preset (default, or tiny for tests)")


def run_toy_data(cfg: ToyDataConfig) -> None:
    from alignkit.toy import toy_data

    toy_data(kind=cfg.kind, n=cfg.n, output=cfg.output, seed=cfg.seed, split=cfg.split, difficulty=cfg.difficulty,
             call_rate=cfg.call_rate)
    print(f"wrote {cfg.n} {cfg.kind} rows to {cfg.output}")


def run_toy_model(cfg: ToyModelConfig) -> None:
    from alignkit.toy import model, toy_model

    cached = cfg.preset in model.PRESETS and model.is_built(model.cache_root() / model.cache_key(cfg.preset, cfg.seed))
    path = toy_model(output=cfg.output, seed=cfg.seed, preset=cfg.preset)
    took = model.build_info(path).get("build_seconds")
    how = f"reused from the cache; built once in {took:.0f} s" if cached and took is not None else \
        (f"built in {took:.0f} s" if took is not None else "ready")
    print(f"toy base model: {path} ({how})")
