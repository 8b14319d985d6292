#!/usr/bin/env bash
# The GPU check: one command on one lent GPU, at most 9 minutes of wall time, using only what that
# machine has (torch 2.11, transformers 5.17, no network, no pip). It writes $OUT/summary.txt, one
# line per part, PASS or FAIL with its figure, each part's log beside it, and exits non-zero if any
# part failed.
#   bash gpu_check.sh                                  # on the GPU: OUT defaults to
#                                                        /tmp/nanobridge-gpu
#   DEVICE=cpu OUT=/tmp/check bash gpu_check.sh        # its dry run on CPU: the same parts at small
#                                                        shapes
# The parts, in this order, each with its own time limit (they add up to 535 s):
#   suite  the test suite on the device under bf16 autocast (NANOBRIDGE_DEVICE/DTYPE): the fast tier
#          plus the slow tests marked `cuda` (the compiled decode). It leaves out, with their reason
#          printed as skips: oneDNN packing, RSS measurements and the gloo-rank (torchrun) tests,
#          which are CPU-only, and the bit-exact comparisons of two training runs (a CUDA backward
#          is not bit-deterministic; resume runs with a bound).
#   bench  bench.py on the device in its quick form: decode against transformers (tiny, 0.5B, 1.5B
#          shapes), the GRPO step of train.py's default
#   setup  random models of DeepSeek-R1-Distill-Qwen-1.5B's shape (all 28 layers, and 4 of them),
#          saved in bf16
#   grpo   one GRPO step of the paper's 1.5B recipe (config/r1_distill_qwen15b.py: width 4, 4,096
#          new tokens, bf16 autocast, chunked head, grad_checkpoint, KL reference) on the 28-layer
#          random model, which never stops early: every row runs to 4,096 tokens, the worst case.
#          Its figure is the memory train.py estimated at start against the peak it measured (the
#          log line's mem).
#   fsdp   the same recipe under FSDP2 at world size 1 (bf16 gathered weights, fp32 reduction,
#          full-state checkpoint) on the 4-layer model: a warm-up step (base weights frozen) then a
#          GRPO step, at 512 new tokens.
#   decode the plan's constants (plan.py): bench_decode.py on the 4-layer model, 64 rows, at two
#          context lengths, eager and compiled (CUDA graphs), each step measured beside the plan's
#          figure for it.
# Checkpoints go to a temporary folder off $OUT (the 1.5B run's is ~30 GB), removed as soon as a
# part is done.
set -uo pipefail
cd "$(dirname "$0")"
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/nanobridge-gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=0

part() {  # part NAME SECONDS COMMAND...: run it with a time limit into $OUT/NAME.log; fig_NAME
          # gives its figure
  local name=$1 limit=$2 t0=$SECONDS rc fig
  shift 2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  fig=$("fig_$name" "$OUT/$name.log" 2>/dev/null | tr '\n' ' ' | head -c 300)
  if [ $rc -eq 0 ]; then
    echo "PASS $name ($((SECONDS - t0)) s): $fig" | tee -a "$OUT/summary.txt"
  else
    failed=1
    [ $rc -eq 124 ] && fig="timed out after $limit s; $fig"
    echo "FAIL $name ($((SECONDS - t0)) s, exit $rc): $fig; log: $OUT/$name.log" |
      tee -a "$OUT/summary.txt"
  fi
}
fig_suite() { grep -E '(passed|failed|error)' "$1" | tail -n 1; }
fig_bench() {  # decode speed against transformers per model and width, and the default GRPO
               # step's time
  grep -E '^\| decode tok/s \(prefill-free\)' "$1" |
    awk -F'|' '{split($3, m, " "); printf "%s w%s %s,", m[1], $4+0, $7}'
  grep -E '^\| GRPO step, train' "$1" |
    awk -F'|' '{gsub(",", "", $5); s += $5} END {printf " GRPO step %.0f ms", s}'
}
fig_setup() { tail -n 1 "$1"; }
fig_grpo() {  # the estimate printed at start against the peak measured in the step
  echo "estimated peak $(grep -E '^grpo: peak' "$1" | awk '{print $3, $4}'), measured $(
    grep -oE 'mem [0-9.]+G' "$1" | tail -n 1)"
  grep -E '^grpo 1/1' "$1" | grep -oE 'tok/s [0-9.e+]+'
}
fig_fsdp() { grep -E '^(warmup|grpo) 1/1' "$1" | grep -oE '^(warmup|grpo) 1/1|mem [0-9.]+G'; }
fig_decode() {
  grep -E '^decode' "$1" | sed -E 's/^decode ([a-z]+) context ([0-9,]+): measured ([0-9.]+) ms, '\
'planned ([0-9.]+) ms.*/\1 \2: \3 ms (plan \4),/'
}

if [ "$DEVICE" = cpu ]; then  # the dry run: small shapes, the same code paths
  SHAPE="hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=512"
  NEW=64 FSDP_NEW=32 SUITE_TIER='not slow' DECODE=(--rows=8 --contexts=64,256)
else  # DeepSeek-R1-Distill-Qwen-1.5B's config.json
  SHAPE="hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
         num_key_value_heads=2, vocab_size=151936"
  NEW=4096 FSDP_NEW=512 SUITE_TIER='not slow or cuda' DECODE=(--rows=64 --contexts=1024,4096)
fi
$PY -c "import torch, transformers, sys; print('INFO', torch.__version__, 'transformers',
        transformers.__version__, 'python', sys.version.split()[0],
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
    2>&1 | tee -a "$OUT/summary.txt"
command -v nvidia-smi > /dev/null &&
  nvidia-smi --query-gpu=compute_mode,memory.used,memory.total --format=csv,noheader \
    | sed 's/^/INFO compute mode, memory used, total: /' | tee -a "$OUT/summary.txt"
echo "INFO disk free under $WORK: $(df -h "$WORK" | awk 'NR == 2 {print $4}')" |
  tee -a "$OUT/summary.txt"

# 1. the suite on the device, bf16
part suite ${SUITE_S:-140} env NANOBRIDGE_DEVICE="$DEVICE" NANOBRIDGE_DTYPE=bfloat16 \
    $PY -m pytest -m "$SUITE_TIER" -p no:cacheprovider -rs --durations=25 \
    --junitxml="$OUT/suite.xml"

# 2. the bench (its memory rows are left out: the suite measures one update on the GPU, the grpo
# part the recipe's)
part bench 70 $PY bench.py --device="$DEVICE" --quick=True --trl=False --mem_tokens=

# 3. random models of the 1.5B's shape, and the recipe's GRPO step on the whole one
part setup 45 $PY - "$WORK" "$SHAPE" <<'PY'
import json, os, sys, torch
from checkpoint import save_model
from model import ModelConfig, Transformer
from tokenizer import write_byte_tokenizer
out, shape = sys.argv[1], eval(f"dict({sys.argv[2]})")
for name, layers in (('random', shape['num_hidden_layers']),
                     ('random4', min(4, shape['num_hidden_layers']))):
    cfg = ModelConfig(**{**shape, 'num_hidden_layers': layers}, tie_word_embeddings=False,
                      rope_theta=10000.0, max_position_embeddings=131072, eos_token_id=256)
    torch.manual_seed(0)
    with torch.device('cuda' if torch.cuda.is_available() else 'cpu'):
        m = Transformer(cfg).to(torch.bfloat16)
    save_model(m, os.path.join(out, name))  # bf16 on disk, like the real checkpoint
    write_byte_tokenizer(os.path.join(out, name))  # any tokenizer will do: a random model's
                                                   # rewards are 0 anyway
    print(f"{name}: {sum(p.numel() for p in m.parameters()):,} params saved")
with open(os.path.join(out, 'math.jsonl'), 'w') as f:
    for a in range(8):
        f.write(json.dumps({'problem': f'What is {a} + {a}?',
                            'solution': f'\\boxed{{{2 * a}}}'}) + '\n')
with open(os.path.join(out, 'warmup_set.jsonl'), 'w') as f:  # a random model answers nothing
                                                             # right: a given set
    for a in range(4):
        group = {'prompt': f'What is {a} + {a}?',
                 'responses': [f'It is \\boxed{{{2 * a}}}.'] * (2 + a)}
        f.write(json.dumps(group) + '\n')
PY
RECIPE=(config/r1_distill_qwen15b.py --data_train="$WORK/math.jsonl" --data_test="$WORK/math.jsonl"
        --warmup_set="$WORK/warmup_set.jsonl" --chat_template=plain --batch_prompts=1
        --device="$DEVICE")
part grpo 170 $PY train.py "${RECIPE[@]}" --init_from="$WORK/random" --mode=grpo --grpo_steps=1 \
    --max_new_tokens=$NEW --out_dir="$WORK/run"
rm -rf "$WORK/run" "$WORK/random"  # its checkpoint (fp32 weights + AdamW state, ~21 GB) and KL
                                   # reference (~7 GB)

# 4. FSDP2 at world size 1
part fsdp 50 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${RECIPE[@]}" \
    --fsdp=True --init_from="$WORK/random4" --mode=warmup,grpo --warmup_steps=1 \
    --warmup_problems=1 --grpo_steps=1 --max_new_tokens=$FSDP_NEW --out_dir="$WORK/run-fsdp"

# 5. the plan's decode constants, measured
part decode 60 $PY bench_decode.py --ckpt="$WORK/random4" --device="$DEVICE" "${DECODE[@]}" \
    --repeats=10

rm -rf "$WORK"
echo "summary: $OUT/summary.txt"
exit $failed
