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
     and mean reward; KL(policy ‖ SFT) per token on the policy's own samples at temperature 1;
  7. opt-in (`methods=...,grpo_calc`): the calculator stage on difficulty=calc, SFT and GRPO with
     the toy calculator (from a model that always calls it, and from one that calls it on about half
     its answers) beside the same without it (`Pipeline.calculator`, docs/agents.md).

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

# One measured figure, said the same way everywhere (README, banner, --help): the README's quick run.
MEASURED = "25 minutes on 2 idle cores of an AMD EPYC (no GPU) at one thread per stage, base model already built"
MEASURED_FULL = "about three times the quick run"
# Seconds per stage (training + evaluation) in the README's quick run (one thread per stage; the base
# build from an idle 2-thread run), for the stage bar's ETA: the bar advances by these weights, so
# its rate is this machine's speed relative to that one.
STAGE_COST_S = {"base": 135, "sft": 49, "reward models": 232, "dpo": 21, "dpo_lora": 23, "reinforce": 50,
                "rloo": 64, "grpo": 109, "rs": 24, "ppo": 178, "online_dpo": 30, "report": 5,
                "gspo": 104, "cispo": 110, "dapo": 100, "kto": 34, "orpo": 18, "distill": 59,
                # the calculator stage (grpo_calc), measured with one thread per run on 2 busy cores
                "calc_sft_tools": 1750, "grpo_calc": 830, "calc_sft_half": 110, "grpo_calc_half": 780,
                "calc_sft": 300, "calc_grpo": 150}

# The calculator stage (`methods=...,grpo_calc`, docs/agents.md): on difficulty=calc (2-3 prices up to
# 300, beyond the tiny model's own sums) the model learns to call `calc` from tool-use transcripts,
# then GRPO with the calculator in the loop; beside it the same SFT and GRPO without the tool. Copying
# three-digit numbers into the call takes the tiny model a long SFT (300-700 steps: right format,
# wrong digits), hence its cost and why it is opt-in. A model that always calls leaves RL nothing to
# teach; so a short SFT on transcripts of which half answer at once (the tool still offered) gives a
# model that knows the call but calls on about half its answers, and GRPO with the calculator from
# there teaches when to call.
CALC = "grpo_calc"
CALC_COST = "about 65 minutes more, measured on 2 busy cores"
CALC_TOOL = "alignkit.toy.world:calc"
CALC_SFT_STEPS = 1450
CALC_GRPO_STEPS = 40
CALC_HALF_STEPS = 100  # the half-calling SFT, from the tool-SFT model: enough to unlearn always calling
CALC_HALF_RATE = 0.5
_CALC_SFT = dict(batch_size=16, lr=1e-3, warmup_steps=15, max_length=256, log_every=50)
# per SFT row: (its data, steps, settings over _CALC_SFT)
_CALC_SFT_RUNS = {"calc_sft_tools": ("sft_tools", CALC_SFT_STEPS, {}),
                  "calc_sft_half": ("sft_half", CALC_HALF_STEPS, dict(lr=3e-4, warmup_steps=5, log_every=10)),
                  "calc_sft": ("sft", CALC_SFT_STEPS, {})}
# lr 1e-4 broke the call format within 20 steps (greedy 72% -> 45%); 4e-5 with 16 x 8 episodes a step kept it
_CALC_GRPO = dict(reward="toy", warmup_steps=2, schedule="constant", sample_every=10, batch_size=16,
                  num_generations=8, lr=4e-5, kl_coef=0.0, iterations=1)
_CALC_TOOLS = dict(tools=CALC_TOOL, chat_template="toy-tools", max_turns=3)
_TOOL_STATS = ("tool_calls", "malformed_calls", "tool_errors")  # per answer, from eval's episodes
CALC_NEW_TOKENS = {True: 96, False: 32}  # per model turn: with the tool (a call of ~60 tokens), without
# (key, row label, data it needs, command, starts from, with the tool), in the order they run
CALC_RUNS = [
    ("calc_sft_tools", "sft + calculator (calc)", "tool-use transcripts", "sft", "base", True),
    (CALC, "grpo + calculator (calc)", "prompts + reward + tool", "grpo", "calc_sft_tools", True),
    ("calc_sft_half", "sft + calculator, calls on half (calc)", "tool-use transcripts, half without a call", "sft",
     "calc_sft_tools", True),
    ("grpo_calc_half", "grpo + calculator, from calls on half (calc)", "prompts + reward + tool", "grpo",
     "calc_sft_half", True),
    ("calc_sft", "sft, no tool (calc)", "demonstrations", "sft", "base", False),
    ("calc_grpo", "grpo, no tool (calc)", "prompts + reward", "grpo", "calc_sft", False),
]


class DemoConfig(Section):
    """Run the post-training pipeline on the toy expenses task and print what each method did."""

    output_dir: str = Field("runs/demo", description="Run folder of the demo")
    mode: Literal["quick", "full"] = Field(
        "quick", description=f"quick: one seed per method ({MEASURED}); full: 3 seeds per method ({MEASURED_FULL})")
    seeds: list[int] | None = Field(None, description="Seeds of the method runs (default: [0] quick, [0, 1, 2] full)")
    methods: list[str] | None = Field(
        None, description="Methods to run after SFT (default: all but grpo_calc): rm, dpo, dpo_lora, kto, orpo, "
        "reinforce, rloo, grpo, gspo, cispo, dapo, rs, ppo, online_dpo, distill (its teacher: the best RL row, so with "
        "at least one RL method); grpo_calc, opt-in: tool SFT + GRPO with the calculator on difficulty=calc beside the "
        f"same training without the tool ({CALC_COST}); [] runs base and SFT only")
    n_eval: int = Field(500, ge=1, description="Held-out prompts for evaluation (500: a standard error of about 0.02 "
                                               "on accuracy)")
    preset: str = Field("default", description="Toy base-model preset (default, or tiny for a fast smoke run)")
    difficulty: str = Field("default", description="Toy task difficulty preset")
    reuse: bool = Field(True, description="Reuse finished stages found in output_dir (base model, SFT, methods); "
                                          "reuse=false runs every stage again (the cached base model is kept)")
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
        # the objectives of docs/objectives.md on GRPO's settings: only the objective differs
        Method("gspo", "grpo", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=2e-5, kl_coef=0.02,
                    iterations=2, ratio_level="sequence", clip_low=3e-4, clip_high=4e-4,
                    aggregation="seq_mean_token_mean")),
        Method("cispo", "grpo", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=2e-5, kl_coef=0.02,
                    iterations=2, loss_type="cispo", clip_high=0.28)),
        # the full DAPO recipe (docs/grpo.md): clip-higher, dynamic sampling, token mean, no KL, overlong
        # shaping over the last third of the 24-token budget (a right answer is far shorter)
        Method("dapo", "grpo", "prompts + reward", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=2e-5, kl_coef=0.0,
                    iterations=2, clip_low=0.2, clip_high=0.28, dynamic_sampling=True, max_refill_rounds=2,
                    aggregation="token_mean", overlong_buffer=8, overlong_penalty=0.5)),
        # KTO on the same on-policy pairs as DPO, each split into a desirable (reference answer) and an
        # undesirable (the SFT model's wrong sample) row, 726 of each. lr swept on this build (docs/methods.md):
        # DPO's 1e-4 collapsed it (greedy 0.196, KL 0.199) as it does DPO without the NLL term (0.314); every
        # lr from 5e-6 up lowered greedy accuracy and none raised T=1 accuracy; 2e-6 is the highest that
        # did not lower either. KTO has no NLL term to anchor the reference answers.
        Method("kto", "kto", "prompts + reference answers", "pairs_onpolicy",
               dict(max_steps=PROMPTS // 32 * 3 // 2, batch_size=32, lr=2e-6, beta=0.1, warmup_steps=2,
                    max_length=256)),
        Method("orpo", "dpo", "prompts + reference answers", "pairs_onpolicy",
               dict(max_steps=PROMPTS // 32 * 3 // 4, batch_size=32, lr=1e-4, loss="orpo", orpo_lambda=0.1,
                    warmup_steps=2, max_length=256)),
        # on-policy distillation of the SFT model from the best RL row of this demo (`teacher` is set
        # when the RL rows are done, see Pipeline.best_rl); runs after every other method
        Method("distill", "distill", "prompts + teacher", "prompts",
               dict(_RL, max_steps=PROMPTS // 16, batch_size=16, num_generations=4, lr=5e-5)),
    ]
}
# Methods whose trained model can teach `distill`: trained on the toy reward.
RL_METHODS = ("reinforce", "rloo", "grpo", "gspo", "cispo", "dapo", "rs", "ppo", "online_dpo")


def _say(msg: str) -> None:
    from alignkit.training.logging import say

    say(msg)  # above the stage bar, never on its line


def _jsonl(path: Path, rows: list[dict]) -> Path:
    world.write_jsonl(rows, path)
    return path


class Pipeline:
    """The demo's stages with one progress bar over all of them.

    The bar advances by each stage's measured cost (STAGE_COST_S), so its ETA is this machine's
    pace on the stages done so far applied to the measured cost of the stages left; reused stages
    leave the total. Within a training stage it follows the run's step from its metrics.jsonl."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.run = Path(cfg.output_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.seeds = cfg.seeds or ([0] if cfg.mode == "quick" else [0, 1, 2])
        chosen = list(METHODS) + ["rm"] if cfg.methods is None else cfg.methods
        self.with_rm = "rm" in chosen
        self.with_calc = CALC in chosen  # opt-in: never in the default list
        # distillation's teacher is the best RL row, so it runs last
        self.methods = sorted((METHODS[m] for m in chosen if m not in ("rm", CALC)), key=lambda m: m.name == "distill")
        self.results_path = self.run / "results.json"
        self.found_results = cfg.reuse and self.results_path.exists()
        self.results: dict = json.loads(self.results_path.read_text()) if self.found_results else {"runs": {}}
        self.bar = None
        self.reused: list[str] = []
        self.ran: list[str] = []
        self._cost = 0.0  # cost of the current stage
        self._credited = 0.0  # part of it already added to the bar
        self._index = 0
        self._stages = 0

    def _save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp, self.results_path)

    # ------------------------------------------------------------------ progress
    def stage(self, label: str, cost_key: str) -> None:
        """Start a stage: the bar shows `[i/n] label`."""
        self._index += 1
        self._cost, self._credited = float(STAGE_COST_S.get(cost_key, 30)) * self._scale(cost_key), 0.0
        text = f"[{self._index}/{self._stages}] {label}"
        if self.bar is not None:
            self.bar.set_description_str(text[:44], refresh=False)
            self._note = ""
            self.bar.set_postfix_str("", refresh=True)
        else:
            _say(f"[demo] {text}")

    def stage_progress(self, frac: float, note: str = "") -> None:
        """Within a stage: `frac` of it done (0..1), `note` beside the bar."""
        if self.bar is None:
            return
        from alignkit.training.logging import refresh_due

        target = self._cost * min(max(frac, 0.0), 0.95)
        if target > self._credited:
            self.bar.update(target - self._credited)
            self._credited = target
        if note != getattr(self, "_note", None):
            self._note = note
            self.bar.set_postfix_str(note, refresh=refresh_due(self.bar))

    def stage_done(self, name: str, reused: bool) -> None:
        (self.reused if reused else self.ran).append(name)
        if self.bar is None:
            return
        if reused:  # nothing to wait for: the stage leaves the estimate
            self.bar.total = max(self.bar.total - self._cost, self.bar.n)
            if getattr(self.bar, "line_interval", None) is None:  # in a log the next line shows it
                self.bar.refresh()
        else:
            self.bar.update(self._cost - self._credited)
        self._credited = self._cost

    def shrink_stage(self, keep: float) -> None:
        """The current stage turned out cheaper: keep only this fraction of its cost."""
        cut = self._cost * (1 - keep)
        self._cost -= cut
        if self.bar is not None:
            self.bar.total = max(self.bar.total - cut, self.bar.n)

    def _scale(self, key: str) -> float:
        # the base build does not scale with `scale`, the tiny preset is much shorter
        if key == "base":
            return 1.0 if self.cfg.preset == "default" else 0.05
        return self.cfg.scale if key != "report" else 1.0

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

    def calc_data(self) -> dict:
        """The calculator stage's data, all on difficulty=calc: tool-use transcripts and plain
        demonstrations (one fresh row per SFT example, the same tasks), transcripts of which half
        answer without a call (other tasks), training prompts and the held-out prompts."""
        d = self.run / "data"
        d.mkdir(exist_ok=True)
        n_sft = 16 * self.steps(CALC_SFT_STEPS)
        files = {"sft_tools": d / "calc_sft_tools.jsonl", "sft": d / "calc_sft.jsonl",
                 "sft_half": d / "calc_sft_half.jsonl",
                 "prompts": d / "calc_prompts_train.jsonl", "eval": d / "calc_prompts_eval.jsonl"}
        if not all(f.exists() for f in files.values()):
            _jsonl(files["sft_tools"], world.sft_tools_rows(n_sft, seed=10, difficulty="calc"))
            _jsonl(files["sft"], world.sft_rows(n_sft, seed=10, difficulty="calc"))
            _jsonl(files["sft_half"], world.sft_tools_rows(16 * self.steps(CALC_HALF_STEPS), seed=20, difficulty="calc",
                                                           call_rate=CALC_HALF_RATE))
            _jsonl(files["prompts"], world.prompt_rows(PROMPTS, seed=12, difficulty="calc"))
            _jsonl(files["eval"], world.prompt_rows(self.cfg.n_eval, seed=0, difficulty="calc", split="eval"))
        return {k: str(v) for k, v in files.items()}

    def calculator(self) -> None:
        """The grpo_calc stage (CALC_RUNS): SFT on tool-use transcripts and GRPO with the calculator; a short
        SFT from there on transcripts of which half answer without a call, and the same GRPO from it; then
        the same SFT and GRPO on difficulty=calc without the tool; every row evaluated on the same
        held-out prompts (with the tool where it was trained with it). One seed (0) in every mode."""
        data = self.calc_data()
        base = self.results["runs"]["base"]["dir"]
        for key, label, needs, command, start, tool in CALC_RUNS:
            self.stage(label, key)
            if self.done(key):
                self.stage_done(key, reused=True)
                continue
            model = base if start == "base" else str(self.run / start)
            extra = dict(_CALC_TOOLS) if tool else {}
            if command == "sft":
                which, full, over = _CALC_SFT_RUNS[key]
                steps = self.steps(full)
                args = dict(_CALC_SFT, **over, model=model, data=data[which], max_steps=steps, seed=0)
                if tool:
                    args["chat_template"] = "toy-tools"
            else:
                steps = self.steps(CALC_GRPO_STEPS)
                args = dict(_CALC_GRPO, **extra, model=model, data=data["prompts"], max_steps=steps, seed=0,
                            log_every=1, max_new_tokens=CALC_NEW_TOKENS[tool], eval_data=data["eval"],
                            eval_prompts=min(100, self.cfg.n_eval), eval_every=max(1, steps // 4))
            rec = self.run_command(key, command, self.run / key, args, total_steps=steps)
            rec.update(method=label, seed=0, needs=needs)
            if rec["returncode"] == 0:
                # KL against the row's own starting SFT model (0 for the SFT rows)
                ref = str(self.run / start) if command == "grpo" else None
                rec["eval"] = self.evaluate(str(self.run / key), ref, calc_tool=tool)
            self.record(key, rec)
            self.stage_done(key, reused=False)

    def onpolicy_pairs(self, sft_dir: str) -> str:
        """Preference pairs from the SFT model's own mistakes: one sample at temperature 1 per training
        prompt; each wrong one is the rejected answer against the reference answer. Offline pairs with
        made-up mistakes (`world.preference_rows`) lowered the SFT model's accuracy in our runs: the
        mistakes it is pushed away from are not the ones it makes."""
        from alignkit.toy.pairs import onpolicy_pairs

        path = self.run / "data" / "pairs_onpolicy.jsonl"
        if not path.exists():
            self.stage_progress(0.0, "sampling the SFT model's answers for pairs")
            t0 = time.time()
            prompts = world.read_jsonl(self.data()["prompts"])
            stats: dict = {}
            rows = onpolicy_pairs(sft_dir, prompts, samples=1, temperature=1.0, seed=0,
                                  max_new_tokens=self.cfg.max_new_tokens, stats=stats)
            # what building the pairs cost (time, sampled tokens) is charged to every method that trains on them
            self.results["pairs_onpolicy"] = {"wall_s": time.time() - t0, "pairs": len(rows), "prompts": len(prompts),
                                              "generated_tokens": stats.get("generated_tokens", 0)}
            self._save()
            world.write_jsonl(rows, path)  # atomic
        return str(path)

    def steps(self, n: int) -> int:
        return max(1, int(round(n * self.cfg.scale)))

    def run_command(self, name: str, command: str, out: Path, args: dict, total_steps: int | None = None,
                    span: tuple[float, float] = (0.0, 1.0)) -> dict:
        """One training run as its own process; its log (plain progress lines, no control codes) goes
        to out/../name.log. While it runs, the stage bar follows its step in metrics.jsonl, over the
        `span` of the stage this run is (two reward models: halves)."""
        argv = [sys.executable, "-m", "alignkit", *command.split(), *(f"{k}={_fmt(v)}" for k, v in args.items()),
                f"output_dir={out}", "progress=true", "report_to=none", "overwrite=true"]
        log = out.parent / f"{out.name}.log"
        metrics = out / "metrics.jsonl"
        t0 = time.time()
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            try:
                while True:
                    try:
                        proc.wait(timeout=2.0)
                        break
                    except subprocess.TimeoutExpired:
                        step = _last_step(metrics) if metrics.exists() and metrics.stat().st_mtime >= t0 else 0
                        if total_steps:
                            frac = span[0] + (span[1] - span[0]) * min(1.0, step / total_steps)
                            self.stage_progress(frac, f"{name}: step {step}/{total_steps}"
                                                if step <= total_steps else f"{name}: step {step}")
                        elif step:
                            self.stage_progress(span[0], f"{name}: step {step}")
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        wall = time.time() - t0
        rec = {"name": name, "command": " ".join(["alignkit", command] + [f"{k}={_fmt(v)}" for k, v in args.items()]),
               "wall_s": wall, "returncode": proc.returncode, "dir": str(out)}
        if proc.returncode != 0:
            tail = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            rec["error"] = tail[-1][:300] if tail else f"exit code {proc.returncode}"
            rec["diverged"] = proc.returncode == 3
        rec.update(_run_stats(out))
        return rec

    def evaluate(self, model_dir: str, ref: str | None, calc_tool: bool | None = None) -> dict:
        """Greedy exact accuracy, format rate and reward; exact accuracy of SAMPLES_T1 samples per prompt at
        temperature 1 (what the online methods optimise; 4 x n_eval answers, a standard error of about 0.01);
        KL to `ref` per token on those samples (0 when ref is None or the model itself).

        calc_tool: None for the demo's own held-out prompts; True / False for the calculator stage's
        (difficulty=calc), with / without the tool; with it, also tool calls and malformed calls per answer
        (greedy; `*_t1`: at temperature 1)."""
        from alignkit.config import EvalConfig
        from alignkit.eval.run import evaluate

        self.stage_progress(0.95, f"evaluating on {self.cfg.n_eval} held-out prompts")
        if calc_tool is None:
            common = dict(prompts=self.data()["eval"], max_new_tokens=self.cfg.max_new_tokens)
        else:
            common = dict(prompts=self.calc_data()["eval"], max_new_tokens=CALC_NEW_TOKENS[calc_tool],
                          **({k: (v.split(",") if k == "tools" else v) for k, v in _CALC_TOOLS.items()}
                             if calc_tool else {}))
        common.update(model=model_dir, reward="toy", task="toy", batch_size=64, num_show=4, seed=0)
        res = evaluate(EvalConfig(**common, temperature=0.0, output_dir=str(Path(model_dir) / "eval_greedy")),
                       verbose=False)
        greedy = res["modes"]["zero_shot"]
        out = {"accuracy": greedy["accuracy"], "format_rate": greedy["format_rate"], "reward": greedy["reward"]}
        for k in _TOOL_STATS:
            if k in greedy:
                out[k] = greedy[k]
        # what eval.json holds: prompt, the data's reference answer, the model's answer and whether it is right
        out["samples"] = [{k: s.get(k) for k in ("prompt", "ref_answer", "completion", "correct")}
                          for s in res["samples"]["zero_shot"]]
        with_ref = ref is not None and Path(ref).resolve() != Path(model_dir).resolve()
        sampled = evaluate(EvalConfig(**common, ref_model=ref if with_ref else None, temperature=1.0,
                                      n_samples=SAMPLES_T1, output_dir=str(Path(model_dir) / "eval_sampled")),
                           verbose=False)["modes"]["zero_shot"]
        out["accuracy_t1"] = sampled["accuracy"]
        for k in _TOOL_STATS:
            if k in sampled:
                out[k + "_t1"] = sampled[k]
        out["kl_token"] = sampled.get("kl_token") if with_ref else 0.0
        out["kl_seq"] = sampled.get("kl_seq") if with_ref else 0.0
        return out

    def done(self, key: str) -> bool:
        rec = self.results["runs"].get(key)
        return bool(self.cfg.reuse and rec and rec.get("returncode") == 0 and "eval" in rec
                    and Path(rec["dir"]).exists())

    def best_rl(self) -> str | None:
        """The folder of the finished RL row (any seed) with the highest greedy held-out accuracy
        (ties: the temperature-1 accuracy), distillation's teacher; None when there is none."""
        best = None
        for rec in self.results["runs"].values():
            if rec.get("method") in RL_METHODS and rec.get("returncode") == 0 and "eval" in rec:
                score = (rec["eval"].get("accuracy", 0.0), rec["eval"].get("accuracy_t1", 0.0))
                if best is None or score > best[0]:
                    best = (score, rec["dir"])
        return None if best is None else best[1]

    def record(self, key: str, rec: dict) -> None:
        self.results["runs"][key] = rec
        self._save()

    # ------------------------------------------------------------------ main
    def go(self) -> dict:
        from alignkit.toy import model as toymodel
        from alignkit.toy import toy_model
        from alignkit.training.logging import progress_bar

        c = self.cfg
        plan = ["base", "sft"] + (["reward models"] if self.with_rm else []) \
            + [m.name for m in self.methods for _ in self.seeds] \
            + ([key for key, *_ in CALC_RUNS] if self.with_calc else []) + ["report"]
        self._stages = len(plan)
        est = MEASURED if c.mode == "quick" else MEASURED_FULL
        if c.scale != 1.0 or c.preset != "default" or c.methods is not None:
            est = f"a shorter run than the measured {MEASURED.split(' on ')[0]}"
        if self.with_calc:
            est += f"; the calculator stage (grpo_calc): {CALC_COST}"
        _say(f"alignkit demo ({c.mode} mode: {len(self.methods)} methods x {len(self.seeds)} seed(s); "
             f"{'expected' if est is MEASURED_FULL else 'measured'}: {est}); run folder {self.run}")
        if self.found_results:
            _say(f"[demo] {self.results_path} exists: finished stages are reused; to run everything again: "
                 f"alignkit demo reuse=false (or a new output_dir=...)")
        self.bar = progress_bar(total=float(sum(STAGE_COST_S.get(k, 30) * self._scale(k) for k in plan)),
                                desc="demo", smoothing=0.0,
                                bar_format="{desc:<44} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        try:
            entry = toymodel.cache_root() / toymodel.cache_key(c.preset, 0)
            cached = toymodel.is_built(entry)
            self.stage("base model (cached build)" if cached else "base model (built once, then cached)", "base")
            if cached:  # only its evaluation is left to wait for
                self.shrink_stage(0.1)
            t0 = time.time()
            base = str(toy_model(seed=0, preset=c.preset))
            data = self.data()
            if cached:
                _say(f"[demo] base model: reusing the cached build {base} (built once in "
                     f"{toymodel.build_info(base).get('build_seconds', '?')} s)")
            if not self.done("base"):
                info = toymodel.build_info(base)
                self.record("base", {"name": "base", "dir": base, "returncode": 0, "cached": cached,
                                     # a cached model shows what building it took, marked as cached
                                     "wall_s": info.get("build_seconds", time.time() - t0) if cached
                                     else time.time() - t0,
                                     "needs": "toy text (pretraining)", "eval": self.evaluate(base, None)})
                self.stage_done("base", reused=False)
            else:
                self.stage_done("base", reused=True)
            self.stage("SFT", "sft")
            sft_dir = self.run / "sft"
            if not self.done("sft"):
                steps = self.steps(300)
                rec = self.run_command("sft", "sft", sft_dir, dict(
                    model=base, data=data["sft"], max_steps=steps, batch_size=16, lr=1e-3,
                    warmup_steps=15, max_length=256, seed=0, log_every=10), total_steps=steps)
                rec["needs"] = "demonstrations"
                if rec["returncode"] != 0:
                    self.record("sft", rec)
                    raise RuntimeError(f"SFT failed: {rec.get('error')} (log: {sft_dir}.log)")
                rec["eval"] = self.evaluate(str(sft_dir), None)  # the KL column is relative to SFT itself
                self.record("sft", rec)
                self.stage_done("sft", reused=False)
            else:
                self.stage_done("sft", reused=True)
            if self.with_rm:
                self.stage("reward models", "reward models")
                ran = False
                for i, kind in enumerate(("scalar", "distributional")):
                    key = f"rm_{kind}"
                    if self.done(key):
                        continue
                    ran = True
                    out = self.run / key
                    steps = self.steps(RM_STEPS)
                    rec = self.run_command(key, "rm", out, dict(
                        model=base, data=data["rm_pairs"], eval_data=data["pairs_eval"], kind=kind, max_steps=steps,
                        batch_size=16, lr=3e-4, warmup_steps=max(1, steps // 20), max_length=256, log_every=50),
                        total_steps=steps, span=(i / 2, (i + 1) / 2))
                    rec["needs"] = "preference pairs"
                    if rec["returncode"] == 0:
                        rec["eval"] = _last_eval(out)
                        rec["eval"]["accuracy_by_mistake"] = _accuracy_by_mistake(out, data["pairs_eval"])
                    self.record(key, rec)
                self.stage_done("reward models", reused=not ran)
            for m in self.methods:
                for seed in self.seeds:
                    key = f"{m.name}" if len(self.seeds) == 1 else f"{m.name}-s{seed}"
                    self.stage(f"{m.name} (seed {seed})", m.name)
                    if self.done(key):
                        self.stage_done(key, reused=True)
                        continue
                    args = dict(m.args)
                    args[m.steps_key] = self.steps(args[m.steps_key])
                    src = self.onpolicy_pairs(str(sft_dir)) if m.data == "pairs_onpolicy" else data[m.data]
                    args.update(model=str(sft_dir), data=src, seed=seed, log_every=1)
                    if m.command == "distill":
                        teacher = self.best_rl()
                        if teacher is None:
                            self.record(key, {"name": key, "command": "alignkit distill", "wall_s": 0.0,
                                              "returncode": 2, "dir": str(self.run / key), "method": m.name,
                                              "seed": seed, "needs": m.needs,
                                              "error": "no RL row finished, so distill has no teacher"})
                            self.stage_done(key, reused=False)
                            continue
                        args["teacher"] = teacher
                    if m.data == "prompts":  # greedy accuracy on held-out prompts 4 times per run, for the curves
                        args.update(eval_data=data["eval"], eval_prompts=min(100, c.n_eval),
                                    eval_every=max(1, args[m.steps_key] // 4))
                    total = args[m.steps_key] * (args.get("rounds", 1) if m.steps_key == "sft_steps" else 1)
                    rec = self.run_command(m.name, m.command, self.run / key, args,
                                           total_steps=None if m.steps_key == "sft_steps" else total)
                    rec.update(method=m.name, seed=seed, needs=m.needs)
                    if m.data == "pairs_onpolicy" and "pairs_onpolicy" in self.results:
                        rec["train_wall_s"] = rec["wall_s"]
                        rec["wall_s"] += self.results["pairs_onpolicy"]["wall_s"]
                        if self.results["pairs_onpolicy"].get("generated_tokens"):
                            rec["generated_tokens"] = self.results["pairs_onpolicy"]["generated_tokens"]
                    if rec["returncode"] == 0:
                        rec["eval"] = self.evaluate(str(self.run / key), str(sft_dir))
                    self.record(key, rec)
                    self.stage_done(key, reused=False)
            if self.with_calc:
                self.calculator()
            self.stage("report", "report")
            from alignkit.eval.report import build_report

            report = build_report([self.run], out_dir=self.run, title="alignkit demo", demo_results=self.results)
            self.stage_done("report", reused=False)
        finally:
            self.bar.close()
            self.bar = None
        print(report["table_text"])
        if not self.ran or self.ran == ["report"]:
            _say(f"[demo] every stage was reused from an earlier run in {self.run} (nothing was re-run; the table "
                 f"above is that run's). To run again: alignkit demo reuse=false, or output_dir=ANOTHER_FOLDER")
        elif self.reused:
            _say(f"[demo] reused {len(self.reused)} finished stage(s) from {self.run}: {', '.join(self.reused)} "
                 f"(reuse=false runs them again)")
        _say(f"report: {self.run / 'report.md'} and {self.run / 'report.html'}")
        return self.results


def _last_step(metrics: Path) -> int:
    """The step of the last train record of a metrics.jsonl being written (0 when none yet)."""
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0
    for ln in reversed(lines):
        try:
            r = json.loads(ln)
        except ValueError:
            continue
        if r.get("kind", "train") == "train":
            return int(r.get("step", 0))
    return 0


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
    # optimizer steps (online records file under the rollout step and carry optimizer_step)
    stats: dict = {"steps": train[-1].get("optimizer_step", train[-1]["step"]) if train else 0}
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

    unknown = [m for m in (cfg.methods or []) if m not in METHODS and m not in ("rm", CALC)]
    if unknown:
        raise UserError(f"methods: unknown {unknown}; choose from rm, {', '.join(METHODS)}, {CALC}")
    if cfg.methods is not None and "distill" in cfg.methods and not any(m in RL_METHODS for m in cfg.methods):
        raise UserError(f"methods: distill learns from the best RL row, so add one of {', '.join(RL_METHODS)} "
                        "to methods")
    return Pipeline(cfg).go()
