"""`alignkit demo`: every method on the embedded toy task, measured side by side.

Pipeline (each stage reused when its output exists, unless reuse=false):
  1. the tiny pretrained base model (`alignkit.toy.toy_model`, cached in the user cache dir);
  2. toy data: SFT demonstrations, preference pairs, training prompts, held-out prompts;
  3. SFT of the base model: the common starting point of every method;
  4. reward models (Bradley-Terry and distributional) on toy pairs, held-out pair accuracy;
  5. each method from the SFT checkpoint, as its own `alignkit <command>` process (so wall time and
     peak memory are its own), under a comparable budget: the same number of training prompts
     (or preference pairs) for every method — `prompts` below;
  6. evaluation of every model on the same held-out prompts: greedy exact accuracy, exact accuracy
     of answers sampled at temperature 1 (what the online methods optimise), format rate
     and mean reward; KL(policy ‖ SFT) per token on the policy's own samples at temperature 1.

The table goes to the terminal and to report.md / report.html / results.json in the run folder,
with curves of reward, accuracy and KL against step and wall time (see `alignkit.eval.report`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignkit.config import Section
from alignkit.toy import world

QUICK_MINUTES = 15


class DemoConfig(Section):
    """Run the post-training pipeline on the toy expenses task and print what each method did."""

    output_dir: str = Field("runs/demo", description="Run folder of the demo")
    mode: Literal["quick", "full"] = Field(
        "quick", description=f"quick: one seed, about {QUICK_MINUTES} minutes on 2 CPU cores; full: 3 seeds per method")
    seeds: list[int] | None = Field(None, description="Seeds of the method runs (default: [0] quick, [0, 1, 2] full)")
    methods: list[str] | None = Field(
        None, description="Methods to run after SFT (default: all): rm, dpo, dpo_lora, reinforce, rloo, grpo, rs, ppo, "
        "online_dpo; [] runs base and SFT only")
    n_eval: int = Field(500, ge=1, description="Held-out prompts for evaluation (500: a standard error of about 0.02 "
                                               "on accuracy)")
    preset: str = Field("default", description="Toy base-model preset (default, or tiny for a fast smoke run)")
    difficulty: str = Field("default", description="Toy task difficulty preset")
    reuse: bool = Field(True, description="Reuse finished stages found in output_dir (base model, SFT, methods)")
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per answer")
    scale: float = Field(1.0, gt=0, description="Multiply every stage's step count (0.1 = a ten-times shorter smoke "
                                                "run)")


@dataclass
class Method:
    name: str
    command: str
    needs: str  # the data the method needs, for the table
    data: str  # which demo data file it trains on
    args: dict = field(default_factory=dict)
    steps_key: str = "max_steps"


# Budget: every method from SFT sees about PROMPTS training prompts (or pairs). Learning rates and
# step counts were tuned on the default preset (docs/methods.md has the numbers behind them).
PROMPTS = 1024
SAMPLES_T1 = 4  # samples per held-out prompt for the temperature-1 accuracy
RM_STEPS = 600  # x 16 fresh pairs: the scalar model reaches about 0.9 held-out accuracy
_RL = dict(reward="toy", max_new_tokens=24, warmup_steps=2, schedule="constant", sample_every=10)

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        # pairs: the SFT model's own wrong answers (one sample per training prompt) vs the reference
        # answers, about 7 of 10 prompts give one; about one epoch; the NLL term (sft_weight) keeps the
        # chosen answers' likelihood from falling with the rejected ones'
        Method("dpo", "dpo", "prompts + reference answers", "pairs_onpolicy",
               dict(max_steps=PROMPTS // 32 * 3 // 4, batch_size=32, lr=1e-4, beta=0.1, sft_weight=1.0,
                    warmup_steps=2, max_length=256)),
        Method("dpo_lora", "dpo", "prompts + reference answers", "pairs_onpolicy",
               {"max_steps": PROMPTS // 32 * 3 // 4, "batch_size": 32, "lr": 1e-3, "beta": 0.1, "sft_weight": 1.0,
                "warmup_steps": 2, "max_length": 256, "peft.method": "lora", "peft.r": 16, "peft.alpha": 32}),
        Method("reinforce", "reinforce", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=4e-5, baseline_alpha=0.8)),
        Method("rloo", "rloo", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=4e-5, kl_coef=0.02)),
        Method("grpo", "grpo", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=2e-5, kl_coef=0.02,
                    iterations=2)),
        Method("rs", "rs", "prompts + reward", "prompts",
               dict(_RL, rounds=2, prompts_per_round=PROMPTS // 2, num_generations=4, sft_steps=40, batch_size=16,
                    lr=2e-5, threshold=1.0), steps_key="sft_steps"),
        Method("ppo", "ppo", "prompts + reward (+ critic)", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=8, num_generations=4, lr=1e-5, critic_lr=5e-4,
                    kl_coef=0.02, ppo_epochs=2, num_minibatches=2)),
        Method("online_dpo", "online-dpo", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=2e-5, beta=0.1,
                    sft_weight=1.0)),
    ]
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    world.write_jsonl(rows, path)
    return path


class Pipeline:
    """The demo's stages with one progress bar over all of them."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.run = Path(cfg.output_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.seeds = cfg.seeds or ([0] if cfg.mode == "quick" else [0, 1, 2])
        chosen = list(METHODS) + ["rm"] if cfg.methods is None else cfg.methods
        self.with_rm = "rm" in chosen
        self.methods = [METHODS[m] for m in chosen if m != "rm"]
        self.results_path = self.run / "results.json"
        self.results: dict = json.loads(self.results_path.read_text()) if cfg.reuse and self.results_path.exists() \
            else {"runs": {}}
        self.bar = None

    def _save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp, self.results_path)

    def stage(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label[:48])
            self.bar.update(1)
        else:
            _say(f"[demo] {label}")

    # ------------------------------------------------------------------ stages
    def data(self) -> dict:
        d = self.run / "data"
        d.mkdir(exist_ok=True)
        c = self.cfg
        files = {
            "sft": d / "sft_train.jsonl",
            "pairs": d / "pairs_train.jsonl",
            "prompts": d / "prompts_train.jsonl",
            "eval": d / "prompts_eval.jsonl",
            "pairs_eval": d / "pairs_eval.jsonl",
            "rm_pairs": d / "rm_pairs_train.jsonl",
        }
        if not all(f.exists() for f in files.values()):
            _jsonl(files["sft"], world.sft_rows(4000, seed=0, difficulty=c.difficulty))
            _jsonl(files["pairs"], world.preference_rows(PROMPTS, seed=1, difficulty=c.difficulty))
            _jsonl(files["prompts"], world.prompt_rows(PROMPTS, seed=2, difficulty=c.difficulty))
            _jsonl(files["eval"], world.prompt_rows(c.n_eval, seed=0, difficulty=c.difficulty, split="eval"))
            _jsonl(files["pairs_eval"], world.preference_rows(400, seed=0, difficulty=c.difficulty, split="eval"))
            # one fresh pair per RM training example: repeated pairs teach a tiny model the totals of
            # those tasks rather than arithmetic
            _jsonl(files["rm_pairs"], world.preference_rows(16 * self.steps(RM_STEPS), seed=3, difficulty=c.difficulty))
        return {k: str(v) for k, v in files.items()}

    def onpolicy_pairs(self, sft_dir: str) -> str:
        """Preference pairs from the SFT model's own mistakes: one sample at temperature 1 per training
        prompt; each wrong one is the rejected answer against the reference answer. Offline pairs with
        made-up mistakes (`world.preference_rows`) lowered the SFT model's accuracy in our runs: the
        mistakes it is pushed away from are not the ones it makes."""
        from alignkit.toy.pairs import onpolicy_pairs

        path = self.run / "data" / "pairs_onpolicy.jsonl"
        if not path.exists():
            t0 = time.time()
            prompts = world.read_jsonl(self.data()["prompts"])
            rows = onpolicy_pairs(sft_dir, prompts, samples=1, temperature=1.0, seed=0,
                                  max_new_tokens=self.cfg.max_new_tokens)
            # what building the pairs cost is charged to every method that trains on them
            self.results["pairs_onpolicy"] = {"wall_s": time.time() - t0, "pairs": len(rows), "prompts": len(prompts)}
            self._save()
            world.write_jsonl(rows, path)  # atomic
        return str(path)

    def steps(self, n: int) -> int:
        return max(1, int(round(n * self.cfg.scale)))

    def run_command(self, name: str, command: str, out: Path, args: dict) -> dict:
        """One training run as its own process; its log goes to out/../name.log."""
        argv = [sys.executable, "-m", "alignkit", *command.split(), *(f"{k}={_fmt(v)}" for k, v in args.items()),
                f"output_dir={out}", "progress=false", "tensorboard=false", "overwrite=true"]
        log = out.parent / f"{out.name}.log"
        t0 = time.time()
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wall = time.time() - t0
        rec = {"name": name, "command": " ".join(["alignkit", command] + [f"{k}={_fmt(v)}" for k, v in args.items()]),
               "wall_s": wall, "returncode": rc.returncode, "dir": str(out)}
        if rc.returncode != 0:
            tail = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            rec["error"] = tail[-1][:300] if tail else f"exit code {rc.returncode}"
            rec["diverged"] = rc.returncode == 3
        rec.update(_run_stats(out))
        return rec

    def evaluate(self, model_dir: str, ref: str | None) -> dict:
        """Greedy exact accuracy, format rate and reward; exact accuracy of SAMPLES_T1 samples per prompt at
        temperature 1 (what the online methods optimise; 4 x n_eval answers, a standard error of about 0.01);
        KL to `ref` per token on those samples (0 when ref is None or the model itself)."""
        from alignkit.config import EvalConfig
        from alignkit.eval.run import evaluate

        data = self.data()
        common = dict(model=model_dir, prompts=data["eval"], reward="toy", task="toy",
                      max_new_tokens=self.cfg.max_new_tokens, batch_size=64, num_show=4, seed=0)
        res = evaluate(EvalConfig(**common, temperature=0.0, output_dir=str(Path(model_dir) / "eval_greedy")),
                       verbose=False)
        greedy = res["modes"]["zero_shot"]
        out = {"accuracy": greedy["accuracy"], "format_rate": greedy["format_rate"], "reward": greedy["reward"]}
        out["samples"] = [s["completion"] for s in res["samples"]["zero_shot"]]  # what eval.json holds
        with_ref = ref is not None and Path(ref).resolve() != Path(model_dir).resolve()
        sampled = evaluate(EvalConfig(**common, ref_model=ref if with_ref else None, temperature=1.0,
                                      n_samples=SAMPLES_T1, output_dir=str(Path(model_dir) / "eval_sampled")),
                           verbose=False)["modes"]["zero_shot"]
        out["accuracy_t1"] = sampled["accuracy"]
        out["kl_token"] = sampled.get("kl_token") if with_ref else 0.0
        out["kl_seq"] = sampled.get("kl_seq") if with_ref else 0.0
        return out

    def done(self, key: str) -> bool:
        rec = self.results["runs"].get(key)
        return bool(self.cfg.reuse and rec and rec.get("returncode") == 0 and "eval" in rec
                    and Path(rec["dir"]).exists())

    def record(self, key: str, rec: dict) -> None:
        self.results["runs"][key] = rec
        self._save()

    # ------------------------------------------------------------------ main
    def go(self) -> dict:
        from tqdm.auto import tqdm

        from alignkit.toy import toy_model

        c = self.cfg
        total = 4 + len(self.methods) * len(self.seeds)
        est = f"about {QUICK_MINUTES} minutes on 2 CPU cores" if c.mode == "quick" else "about an hour per seed"
        _say(f"alignkit demo ({c.mode} mode: {len(self.methods)} methods x {len(self.seeds)} seed(s), {est}); "
             f"run folder {self.run}")
        self.bar = tqdm(total=total, desc="demo", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc:<48} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}")
        try:
            self.stage("base model (built once, cached)")
            t0 = time.time()
            base = str(toy_model(seed=0, preset=c.preset))
            data = self.data()
            if not self.done("base"):
                self.record("base", {"name": "base", "dir": base, "wall_s": time.time() - t0, "returncode": 0,
                                     "needs": "toy text (pretraining)", "eval": self.evaluate(base, None)})
            self.stage("SFT")
            sft_dir = self.run / "sft"
            if not self.done("sft"):
                rec = self.run_command("sft", "sft", sft_dir, dict(
                    model=base, data=data["sft"], max_steps=self.steps(300), batch_size=16, lr=1e-3,
                    warmup_steps=15, max_length=256, seed=0, log_every=10))
                rec["needs"] = "demonstrations"
                if rec["returncode"] != 0:
                    self.record("sft", rec)
                    raise RuntimeError(f"SFT failed: {rec.get('error')} (log: {sft_dir}.log)")
                rec["eval"] = self.evaluate(str(sft_dir), None)  # the KL column is relative to SFT itself
                self.record("sft", rec)
            self.stage("reward models")
            if self.with_rm:
                for kind in ("scalar", "distributional"):
                    key = f"rm_{kind}"
                    if self.done(key):
                        continue
                    out = self.run / key
                    steps = self.steps(RM_STEPS)
                    rec = self.run_command(key, "rm", out, dict(
                        model=base, data=data["rm_pairs"], eval_data=data["pairs_eval"], kind=kind, max_steps=steps,
                        batch_size=16, lr=3e-4, warmup_steps=max(1, steps // 20), max_length=256, log_every=50))
                    rec["needs"] = "preference pairs"
                    if rec["returncode"] == 0:
                        rec["eval"] = _last_eval(out)
                        rec["eval"]["accuracy_by_mistake"] = _accuracy_by_mistake(out, data["pairs_eval"])
                    self.record(key, rec)
            for m in self.methods:
                for seed in self.seeds:
                    key = f"{m.name}" if len(self.seeds) == 1 else f"{m.name}-s{seed}"
                    self.stage(f"{m.name} (seed {seed})")
                    if self.done(key):
                        continue
                    args = dict(m.args)
                    args[m.steps_key] = self.steps(args[m.steps_key])
                    src = self.onpolicy_pairs(str(sft_dir)) if m.data == "pairs_onpolicy" else data[m.data]
                    args.update(model=str(sft_dir), data=src, seed=seed, log_every=1)
                    if m.data == "prompts":  # greedy accuracy on held-out prompts 4 times per run, for the curves
                        args.update(eval_data=data["eval"], eval_prompts=min(100, c.n_eval),
                                    eval_every=max(1, args[m.steps_key] // 4))
                    rec = self.run_command(m.name, m.command, self.run / key, args)
                    rec.update(method=m.name, seed=seed, needs=m.needs)
                    if m.data == "pairs_onpolicy" and "pairs_onpolicy" in self.results:
                        rec["train_wall_s"] = rec["wall_s"]
                        rec["wall_s"] += self.results["pairs_onpolicy"]["wall_s"]
                    if rec["returncode"] == 0:
                        rec["eval"] = self.evaluate(str(self.run / key), str(sft_dir))
                    self.record(key, rec)
            self.stage("report")
        finally:
            self.bar.close()
            self.bar = None
        from alignkit.eval.report import build_report

        report = build_report([self.run], out_dir=self.run, title="alignkit demo", demo_results=self.results)
        print(report["table_text"])
        _say(f"report: {self.run / 'report.md'} and {self.run / 'report.html'}")
        return self.results


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def _run_stats(out: Path) -> dict:
    """Peak memory, generated tokens and step count from a run's metrics.jsonl."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    train = [r for r in world.read_jsonl(path) if r.get("kind") == "train"]
    stats: dict = {"steps": train[-1]["step"] if train else 0}
    peaks = [r["peak_rss_mb"] for r in train if "peak_rss_mb" in r]
    if peaks:
        stats["peak_rss_mb"] = max(peaks)
    gen = [r["generated_tokens"] for r in train if "generated_tokens" in r]
    if gen:
        stats["generated_tokens"] = int(max(gen))
    bad = [r for r in train if isinstance(r.get("loss"), str) or (isinstance(r.get("loss"), float)
                                                                   and not math.isfinite(r["loss"]))]
    if bad:
        stats["diverged"] = True
    return stats


def _accuracy_by_mistake(model_dir: Path, pairs_path: str) -> dict:
    """Held-out accuracy of a saved reward model per kind of rejected answer (toy rows' `mistake`)."""
    from alignkit.models.reward import RewardModel

    rows = world.read_jsonl(pairs_path)
    rm = RewardModel.from_pretrained(model_dir)
    prompts = [r["prompt"] for r in rows]
    r_w = rm.score(prompts, [r["chosen"] for r in rows])
    r_l = rm.score(prompts, [r["rejected"] for r in rows])
    won: dict[str, list[float]] = {}
    for r, a, b in zip(rows, r_w, r_l):
        won.setdefault(r["mistake"], []).append(1.0 if a > b else 0.5 if a == b else 0.0)
    return {k: sum(v) / len(v) for k, v in sorted(won.items())}


def _last_eval(out: Path) -> dict:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    evals = [r for r in world.read_jsonl(path) if r.get("kind") == "eval"]
    return {k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "kind", "time")}


def run_demo(cfg: DemoConfig) -> dict:
    from alignkit.errors import UserError

    unknown = [m for m in (cfg.methods or []) if m not in METHODS and m != "rm"]
    if unknown:
        raise UserError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return Pipeline(cfg).go()
