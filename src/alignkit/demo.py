"""`alignkit demo`: the pipeline on the embedded toy task, measured.

Builds (or reuses) the tiny pretrained base model, runs SFT on toy demonstrations, and compares
exact accuracy, format rate and mean reward on held-out prompts before and after, as a table on
the terminal and in the run folder (report.md, results.json, curves.png).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pydantic import Field

from alignkit.config import Section


class DemoConfig(Section):
    """Run the post-training pipeline on the toy expenses task and print what each stage did."""

    output_dir: str = Field("runs/demo", description="Run folder of the demo")
    seed: int = Field(0, description="Seed of data, model build and training")
    n_train: int = Field(2000, ge=8, description="SFT demonstrations")
    n_eval: int = Field(200, ge=1, description="Held-out prompts for evaluation")
    sft_steps: int = Field(300, ge=1, description="SFT optimizer steps")
    sft_lr: float = Field(1e-3, gt=0, description="SFT learning rate")
    batch_size: int = Field(16, ge=1, description="SFT micro-batch size")
    preset: str = Field("default", description="Toy base-model preset (default, or tiny for a fast smoke run)")
    difficulty: str = Field("default", description="Toy task difficulty preset")
    reuse: bool = Field(True, description="Reuse finished stages found in output_dir")
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per answer")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate_toy(model_dir: str, prompts: list[dict], max_new_tokens: int) -> dict:
    from alignkit.eval.generate import generate_texts
    from alignkit.models import load_model, load_tokenizer
    from alignkit.toy import world

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    texts = generate_texts(model, tok, [p["prompt"] for p in prompts], max_new_tokens=max_new_tokens)
    scores = [world.score(t, p["total"]) for t, p in zip(texts, prompts)]
    n = len(scores)
    return {
        "accuracy": sum(s["correct"] for s in scores) / n,
        "format_rate": sum(s["format_ok"] for s in scores) / n,
        "mean_reward": sum(s["reward"] for s in scores) / n,
        "samples": [{"prompt": p["prompt"][-1]["content"], "completion": t} for p, t in zip(prompts[:3], texts[:3])],
    }


def run_demo(cfg: DemoConfig) -> dict:
    from alignkit.config import SFTConfig
    from alignkit.recipes.sft import train_sft
    from alignkit.toy import toy_model, world

    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _say(f"[1/4] base model (toy preset '{cfg.preset}', built once and cached)")
    base = str(toy_model(seed=cfg.seed, preset=cfg.preset))
    _say(f"      {base}")

    data_dir = run / "data"
    data_dir.mkdir(exist_ok=True)
    sft_path = data_dir / "sft_train.jsonl"
    world.write_jsonl(world.sft_rows(cfg.n_train, seed=cfg.seed, difficulty=cfg.difficulty), sft_path)
    eval_prompts = world.prompt_rows(cfg.n_eval, seed=cfg.seed, difficulty=cfg.difficulty, split="eval")
    world.write_jsonl(eval_prompts, data_dir / "eval_prompts.jsonl")

    results: dict = {}
    _say(f"[2/4] evaluating the base model on {cfg.n_eval} held-out prompts")
    results["base"] = evaluate_toy(base, eval_prompts, cfg.max_new_tokens)

    sft_dir = run / "sft"
    _say(f"[3/4] SFT: {cfg.sft_steps} steps on {cfg.n_train} demonstrations")
    t = time.time()
    if not (cfg.reuse and (sft_dir / "config.json").exists()):
        train_sft(SFTConfig(model=base, data=str(sft_path), output_dir=str(sft_dir), max_steps=cfg.sft_steps,
                            batch_size=cfg.batch_size, lr=cfg.sft_lr, warmup_steps=max(1, cfg.sft_steps // 20),
                            schedule="cosine", max_length=256, seed=cfg.seed, overwrite=True, save_every=0,
                            log_every=10, tensorboard=False))
    sft_time = time.time() - t
    _say("[4/4] evaluating the SFT model")
    results["sft"] = evaluate_toy(str(sft_dir), eval_prompts, cfg.max_new_tokens)
    results["sft"]["wall_s"] = sft_time

    table = format_table(results)
    print(table)
    (run / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    report = ["# alignkit demo", "", f"Toy task, {cfg.n_eval} held-out prompts, greedy decoding.", "", table, ""]
    for name, r in results.items():
        report += [f"## {name}: sample completions", ""]
        for s in r["samples"]:
            report += [f"- `{s['completion']}`"]
        report.append("")
    report.append("SFT curves: sft/curves.png")
    (run / "report.md").write_text("\n".join(report), encoding="utf-8")
    _say(f"demo done in {time.time() - t0:.0f}s; run folder: {run}")
    return results


def format_table(results: dict) -> str:
    head = "| stage | exact accuracy | format rate | mean reward | train wall time |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        wall = f"{r['wall_s']:.0f}s" if "wall_s" in r else "-"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['format_rate']:.3f} | {r['mean_reward']:.3f} | {wall} |")
    return "\n".join(lines)
