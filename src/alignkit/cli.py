"""`alignkit <command> [config.yaml] [key=value ...]`

Every command reads an optional YAML file plus dotted `key=value` overrides into a typed config;
`alignkit <command> --help` lists every key with its type, default and description. Mistakes in
the input print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

from alignkit.errors import UserError


@dataclass
class Command:
    name: str
    summary: str
    config: Callable[[], type]  # lazy: keeps `alignkit --help` fast
    run: Callable[[object], object]


def _sft_cfg():
    from alignkit.config import SFTConfig

    return SFTConfig


def _sft_run(cfg):
    from alignkit.recipes.sft import train_sft

    res = train_sft(cfg)
    _done(cfg.output_dir, res)


def _rm_cfg():
    from alignkit.config import RMConfig

    return RMConfig


def _rm_run(cfg):
    from alignkit.recipes.rm import train_rm

    res = train_rm(cfg)
    _done(cfg.output_dir, res)


def _dpo_cfg():
    from alignkit.config import DPOConfig

    return DPOConfig


def _dpo_run(cfg):
    if cfg.loss == "kto":  # KTO is its own recipe, built on DPO's pieces
        return _kto_run(cfg)
    from alignkit.recipes.dpo import train_dpo

    res = train_dpo(cfg)
    _done(cfg.output_dir, res)


def _kto_cfg():
    from alignkit.config import KTOConfig

    return KTOConfig


def _kto_run(cfg):
    from alignkit.recipes.kto import train_kto

    res = train_kto(cfg)
    _done(cfg.output_dir, res)


def _inspect_cfg():
    from alignkit.data.inspect import InspectConfig

    return InspectConfig


def _inspect_run(cfg):
    from alignkit.data.inspect import inspect_data

    inspect_data(cfg)


def _toy_data_cfg():
    from alignkit.toy.cli import ToyDataConfig

    return ToyDataConfig


def _toy_data_run(cfg):
    from alignkit.toy.cli import run_toy_data

    run_toy_data(cfg)


def _toy_model_cfg():
    from alignkit.toy.cli import ToyModelConfig

    return ToyModelConfig


def _toy_model_run(cfg):
    from alignkit.toy.cli import run_toy_model

    run_toy_model(cfg)


def _eval_cfg():
    from alignkit.config import EvalConfig

    return EvalConfig


def _eval_run(cfg):
    from alignkit.eval.run import evaluate

    evaluate(cfg)


def _demo_cfg():
    from alignkit.demo import DemoConfig

    return DemoConfig


def _demo_run(cfg):
    from alignkit.demo import run_demo

    run_demo(cfg)


def _online(name: str, cfg_name: str, fn_name: str) -> Command:
    """An online RL recipe command: config class and train function looked up lazily."""
    import importlib

    def cfg():
        return getattr(importlib.import_module("alignkit.config"), cfg_name)

    def run(c):
        res = getattr(importlib.import_module(f"alignkit.recipes.{name}"), fn_name)(c)
        _done(c.output_dir, res)

    return cfg, run


def _rs_generate_run(cfg):
    from alignkit.recipes.rs import generate_best_of_n

    generate_best_of_n(cfg)


def _vllm_serve_cfg():
    from alignkit.config import VLLMServeConfig

    return VLLMServeConfig


def _vllm_serve_run(cfg):
    from alignkit.rollout.vllm_server import serve

    if not cfg.model:
        raise UserError("vllm-serve: give the model to serve: model=<folder or hub id>")
    serve(cfg.model, cfg.host, cfg.port, dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
          gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_gb=cfg.kv_cache_gb,
          tensor_parallel_size=cfg.tensor_parallel_size, ready_file=cfg.ready_file)


def _merge_cfg():
    from alignkit.models.peft import MergeConfig

    return MergeConfig


def _merge_run(cfg):
    from alignkit.models.peft import merge_adapter

    out = merge_adapter(cfg)
    print(f"done: merged model written to {out.resolve()}")


def _report_cfg():
    from alignkit.eval.report_cli import ReportConfig

    return ReportConfig


def _report_run(cfg):
    from alignkit.eval.report_cli import run_report

    run_report(cfg)


def _done(output_dir: str, res) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        extra = ""
        if isinstance(res, dict) and res:
            extra = " (" + ", ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float)) + ")"
        print(f"done: model saved to {output_dir}{extra}")


COMMANDS: dict[str, Command] = {
    "sft": Command("sft", "supervised fine-tuning, loss on the answer tokens only", _sft_cfg, _sft_run),
    "rm": Command("rm", "reward model from preference pairs (scalar Bradley-Terry or distributional)", _rm_cfg,
                  _rm_run),
    "dpo": Command("dpo", "preference optimisation on chosen/rejected pairs (DPO, IPO, hinge, robust, SimPO, "
                   "ORPO, KTO)", _dpo_cfg, _dpo_run),
    "kto": Command("kto", "KTO on unpaired rows labelled desirable / undesirable (or pairs split in two)",
                   _kto_cfg, _kto_run),
    "data inspect": Command("data inspect", "show each token of a few rows with its loss mask", _inspect_cfg,
                            _inspect_run),
    "toy data": Command("toy data", "write toy-task data (sft | preference | prompts | pretrain) as JSONL",
                        _toy_data_cfg, _toy_data_run),
    "toy model": Command("toy model", "build (or reuse) the tiny pretrained base model of the toy task",
                         _toy_model_cfg, _toy_model_run),
    "reinforce": Command("reinforce", "REINFORCE with a moving-average baseline", *_online("reinforce", "ReinforceConfig",
                                                                                       "train_reinforce")),
    "rloo": Command("rloo", "REINFORCE with the leave-one-out baseline over k samples per prompt",
                    *_online("rloo", "RLOOConfig", "train_rloo")),
    "grpo": Command("grpo", "group-normalised advantages, clipped ratio, KL to the reference",
                    *_online("grpo", "GRPOConfig", "train_grpo")),
    "ppo": Command("ppo", "PPO with a critic: per-token KL penalty, GAE, clipped policy and value losses",
                   *_online("ppo", "PPOConfig", "train_ppo")),
    "online-dpo": Command("online-dpo", "DPO on best-vs-worst pairs sampled from the current policy",
                          *_online("online_dpo", "OnlineDPOConfig", "train_online_dpo")),
    "rs": Command("rs", "rejection sampling: best-of-N, then SFT on the winners (rounds)",
                  *_online("rs", "RSConfig", "train_rs")),
    "distill": Command("distill", "on-policy distillation: the student samples, the teacher scores every token "
                       "(reverse KL or generalized JSD)", *_online("distill", "DistillConfig", "train_distill")),
    "rs generate": Command("rs generate", "write the best-of-N answers of a prompt set as SFT rows (no training)",
                           _online("rs", "RSConfig", "train_rs")[0], _rs_generate_run),
    "eval": Command("eval", "evaluate a model: reward, KL to a reference, accuracy, win rate, perplexity, "
                    "prompting modes", _eval_cfg, _eval_run),
    "vllm-serve": Command("vllm-serve", "serve a model with vLLM for runs with rollout_engine=vllm vllm.mode=server",
                          _vllm_serve_cfg, _vllm_serve_run),
    "merge": Command("merge", "fold a trained adapter into its base model and save a plain transformers model",
                     _merge_cfg, _merge_run),
    "report": Command("report", "table, curves and samples for any set of run folders (report.md, report.html)",
                      _report_cfg, _report_run),
    "demo": Command("demo", "run the pipeline on the embedded toy task and print the measured table",
                    _demo_cfg, _demo_run),
}

# Positional arguments some commands take before key=value pairs.
POSITIONAL = {"data inspect": "data", "report": "runs"}


def usage() -> str:
    lines = ["usage: alignkit <command> [config.yaml] [key=value ...]", "", "commands:"]
    width = max(len(n) for n in COMMANDS) + 2
    for name, c in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}{c.summary}")
    lines += ["", "`alignkit <command> --help` lists every key of a command; `alignkit --version` prints the "
              "version."]
    return "\n".join(lines)


def command_help(cmd: Command) -> str:
    from alignkit.config import help_table

    cls = cmd.config()
    pos = POSITIONAL.get(cmd.name)
    head = f"usage: alignkit {cmd.name} {'FILE ' if pos else ''}[config.yaml] [key=value ...]\n\n"
    import inspect

    doc = inspect.cleandoc(cls.__doc__ or "")
    # the summary and the config's docstring often say the same thing: print it once
    head += (doc if doc and _same_text(doc.split("\n\n")[0], cmd.summary) else
             cmd.summary + ("\n\n" + doc if doc else "")) + "\n"
    rows = help_table(cls)
    kw = max(len(r[0]) for r in rows)
    tw = min(max(len(r[1]) for r in rows), 28)
    out = [head, "keys:"]
    for key, typ, default, desc in rows:
        if len(typ) <= tw:
            out.append(f"  {key.ljust(kw)}  {typ.ljust(tw)}  default {default}")
        else:  # a long choice list is shown whole, the default on the next line
            out.append(f"  {key.ljust(kw)}  {typ}")
            out.append(f"  {' ' * kw}  {' ' * tw}  default {default}")
        out += ["      " + ln for ln in textwrap.wrap(desc, 90)]
    return "\n".join(out)


def _same_text(a: str, b: str) -> bool:
    import difflib
    import re

    wa, wb = (re.sub(r"[^\w\- ]+", " ", t.lower()).split() for t in (a, b))
    # the summary (b) is mostly said again by the docstring's first paragraph (a)
    shared = sum(w in set(wa) for w in wb) / max(1, len(wb))
    return wa[:4] == wb[:4] or shared >= 0.5 or difflib.SequenceMatcher(None, " ".join(wa), " ".join(wb)).ratio() > 0.8


def parse(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help", "help"):
        return None, None
    name = argv[0]
    rest = argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        subs = [c for c in COMMANDS if c.startswith(name + " ")]
        if subs:
            raise UserError(f"'{name}' needs a subcommand: {', '.join(s.split(' ', 1)[1] for s in subs)}")
        hint = f"; did you mean '{near[0]}'?" if near else "; run `alignkit --help`"
        raise UserError(f"unknown command '{name}'{hint}")
    return COMMANDS[name], rest


def build_config(cmd: Command, rest: list[str]):
    from alignkit.config import load_config

    path = None
    overrides: list[str] = []
    positional: list[str] = []
    pos_key = POSITIONAL.get(cmd.name)
    for a in rest:
        if "=" in a:
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")) and path is None and not (pos_key and a.endswith(".jsonl")):
            path = a
        elif pos_key and cmd.name == "report":
            positional.append(a)
        elif pos_key and not any(o.startswith(pos_key + "=") for o in overrides):
            overrides.append(f"{pos_key}={a}")
        elif a.startswith("-"):
            raise UserError(f"unknown option '{a}'; options are key=value pairs (see `alignkit {cmd.name} --help`)")
        else:
            raise UserError(f"unexpected argument '{a}'; expected config.yaml or key=value")
    if positional:
        import json

        overrides.append(f"{pos_key}={json.dumps(positional)}")
    return load_config(cmd.config(), path, overrides)


def _check_before_run(cmd: Command, cfg) -> None:
    """Checks of the config that need no model or data, run before anything loads or is
    written: the model folders named must exist and be readable (or be hub ids the hub can
    serve), and the output folder must be one this run can create and write."""
    from alignkit.config import check_output_dir

    for key, what in (("model", "model"), ("ref_model", "reference model")):
        val = getattr(cfg, key, None)
        if isinstance(val, str) and val:
            from alignkit.models.load import check_source

            check_source(val, what, key)

    if hasattr(cfg, "rollout_engine"):  # vLLM missing, adapters it cannot take: before any model loads
        from alignkit.rollout.vllm_engine import check_engine_config, check_vllm_model

        if check_engine_config(cfg) == "vllm" and cfg.vllm.mode == "colocate" and cfg.model:
            import torch

            check_vllm_model(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")  # architecture, head size
    out = getattr(cfg, "output_dir", None)
    if isinstance(out, str):
        check_output_dir(out)
        trains = hasattr(cfg, "resume") and cmd.name != "rs generate"  # rs generate writes `output` only
        if trains and not cfg.resume and not getattr(cfg, "overwrite", False):
            # The trainer refuses this too, but only after loading (and after its loggers opened
            # files in the old run); refusing here leaves the old run untouched.
            from pathlib import Path

            from alignkit.training import checkpoint as ckpt

            run = Path(os.path.expanduser(out))
            if run.is_dir() and ((run / "config.json").exists() or ckpt.list_checkpoints(run)):
                raise UserError(f"{out}: output_dir already holds a run; pass resume=true to continue it, "
                                "overwrite=true to replace it, or another output_dir")
    for key in ("output",):  # merge / report / rs generate / toy data: a folder or a file path
        val = getattr(cfg, key, None)
        if isinstance(val, str) and val:
            from pathlib import Path

            target = Path(os.path.expanduser(val))
            if cmd.name in ("toy data", "rs generate"):  # a file: its folder must be writable
                if target.is_dir():
                    raise UserError(f"{val}: {key} is a folder; give a file path such as {val.rstrip('/')}/rows.jsonl")
                anc = target.parent
                while not anc.exists() and anc.parent != anc:
                    anc = anc.parent
                if anc.exists() and not anc.is_dir():
                    raise UserError(f"{val}: {key} lies under {anc}, which is a file, not a folder; pick another {key}")
                check_output_dir(str(target.parent), key)
            else:
                check_output_dir(val, key)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V", "version"):
        from alignkit import __version__

        print(f"alignkit {__version__}")
        return 0
    from alignkit.training.logging import quiet_library_bars

    quiet_library_bars()  # in logs: no shard-loading bars from transformers
    try:
        cmd, rest = parse(argv)
        if cmd is None:
            print(usage())
            return 0
        if any(a in ("-h", "--help") for a in rest):
            print(command_help(cmd))
            return 0
        cfg = build_config(cmd, rest)
        _check_before_run(cmd, cfg)
        if getattr(cfg, "trust_remote_code", False):
            from alignkit.models.load import allow_remote_code

            with allow_remote_code(True):
                cmd.run(cfg)
        else:  # loaders pass trust_remote_code=False by default
            cmd.run(cfg)
        from alignkit.training.dist import shutdown

        shutdown()
        return 0
    except UserError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `alignkit sft --help | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
