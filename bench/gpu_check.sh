#!/bin/bash
# One pass of the GPU checks on a machine with one CUDA GPU: the `gpu`-marked tests, then the
# GPU benchmarks (alignkit vs TRL / transformers, bf16, at a Qwen2.5-0.5B-sized shape with a
# 151,936-token vocabulary). Every step has its own time limit and the next step runs whatever
# happened, so one failure costs one step. Logs and raw JSON go to $OUT (default /tmp/gpu_out).
#
#   bash bench/gpu_check.sh                # everything (about 8 minutes on one H200)
#   STEPS="tests sft" bash bench/gpu_check.sh
#
# Packages the machine lacks can be unpacked into .gpu/site (wheels unzipped there); it then goes
# first on PYTHONPATH. BENCHMARKS.md's GPU section says what was measured with this script.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"env tests sft grpo rollout dpo"}
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=8
# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936)
SHAPE="--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --vocab 151936 --threads 8"
W=/tmp/gpu_ws
T0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((t - T0))s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s"
  tail -n 25 "$OUT/$name.log"
}

step env 60 bash -c "nvidia-smi -L; $PY -c 'import sys, torch, transformers, peft, trl, datasets, pyarrow, bitsandbytes, pydantic;
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0));
print(\"transformers\", transformers.__version__, \"peft\", peft.__version__, \"trl\", trl.__version__, \"datasets\", datasets.__version__, \"pyarrow\", pyarrow.__version__, \"bnb\", bitsandbytes.__version__)'"
step tests 150 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider --timeout 120 -rfE
step sft 130 $PY bench/bench_sft.py --device cuda $SHAPE --variants padded --repeats 1 --steps 15 --batch-size 16 \
  --rows 512 --lr 1e-5 --workdir $W/sft --json "$OUT/sft.json"
step grpo 150 $PY bench/bench_grpo.py --device cuda $SHAPE --variants grpo --repeats 1 --steps 4 --group 8 \
  --prompts-per-step 8 --grad-accum 1 --max-new-tokens 128 --workdir $W/grpo --json "$OUT/grpo.json"
step rollout 70 $PY bench/bench_rollout.py --device cuda $SHAPE --variants eos --repeats 1 --prompts 32 --group 8 \
  --max-new-tokens 128 --workdir $W/rollout --json "$OUT/rollout.json"
step dpo 110 $PY bench/bench_dpo.py --device cuda $SHAPE --variants full --sides alignkit,trl --repeats 1 --steps 10 \
  --batch-size 8 --pairs 128 --workdir $W/dpo --json "$OUT/dpo.json"
# Diagnostics, not in the default STEPS: launch cost, and op tables (CPU and CUDA) of one run per side
step launch 60 $PY bench/gpu_launch.py
step prof_sft 150 $PY bench/bench_sft.py --device cuda $SHAPE --variants padded --steps 8 --batch-size 16 --rows 256 \
  --lr 1e-5 --workdir $W/psft --profile "$OUT/prof"
step prof_rollout 120 $PY bench/bench_rollout.py --device cuda $SHAPE --variants eos --prompts 8 --group 8 \
  --max-new-tokens 64 --workdir $W/prollout --profile "$OUT/prof"
echo "=== total $(( $(date +%s) - T0 ))s"
