"""Rollout throughput on CPU: alignkit's RolloutEngine vs vLLM (VLLMEngine), same settings.

The workspace of bench_rollout.py (random-init Llama, hidden 256 / 4 layers / 4 heads of 64,
chat prompts of 30-80 tokens, a stop set of the eos plus 1/32 of the vocabulary so completions
end at uneven lengths) is sampled by both engines: G samples for each of P prompts, temperature
1, no top-k / top-p, the same max_new_tokens and stop ids, float32. Each side runs in a fresh
process (vLLM's from the vLLM environment, `--vllm-python`), does one untimed warm-up call, then
one timed call; counted: generated tokens (up to and including the stop token) per second of wall
time inside generate. The vLLM side also reports its import and engine start times.

    python bench/bench_vllm.py --vllm-python .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.rollout.engine import RolloutEngine, SamplingParams

    work = Path(args.workdir)
    meta = json.loads((work / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(work / "model")
    prompts = meta["prompt_ids"][: args.prompts]
    stop = set(meta["stop_ids"])
    info: dict = {"side": args.child}
    if args.child == "alignkit":
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
        engine = RolloutEngine(tok, stop_token_ids=stop)
    else:
        t0 = time.perf_counter()
        from alignkit.rollout.vllm_engine import VLLMEngine, require_vllm

        require_vllm()
        info["import_s"] = time.perf_counter() - t0
        model = None  # the engine's own weights, loaded from the same folder
        engine = VLLMEngine(tok, str(work / "model"), dtype="float32", stop_token_ids=stop, max_model_len=256)
        info["start_s"] = engine.start_seconds
    p = SamplingParams(n=args.group, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1)
    engine.generate(model, prompts, p)  # warm-up
    p.seed = 2
    t0 = time.perf_counter()
    batch = engine.generate(model, prompts, p)
    dt = time.perf_counter() - t0
    toks = sum(len(s.completion_ids) for s in batch.samples)
    info.update(tokens=toks, seconds=dt, tokens_per_s=toks / dt)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=sys.executable, help="python of the environment with vLLM")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", "-G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", choices=("alignkit", "vllm"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    import bench_rollout as br
    import common

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_vllm_"))
    shape = common.ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192)
    br.RLWorkspace(work, shape, n_prompts=max(64, args.prompts), min_tokens=30, max_tokens=80, stop_frac=1 / 32)
    load = os.getloadavg()
    rows = []
    for side, py in (("alignkit", sys.executable), ("vllm", args.vllm_python)):
        cmd = [py, __file__, "--child", side, "--workdir", str(work), "--prompts", str(args.prompts),
               "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            sys.exit(f"{side} child failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    print(f"{args.prompts} prompts x {args.group} samples, max_new_tokens {args.max_new_tokens}")
    for r in rows:
        extra = f" (import {r['import_s']:.1f} s, engine start {r['start_s']:.1f} s)" if "start_s" in r else ""
        print(f"{r['side']:9s} {r['tokens']:6d} tokens in {r['seconds']:6.2f} s = {r['tokens_per_s']:8.1f} tok/s{extra}")


if __name__ == "__main__":
    main()
