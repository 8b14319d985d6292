#!/usr/bin/env bash
# The prepared GPU check: one command, one GPU, a few minutes (not yet run: no GPU has been lent to this work).
#   bash gpu_check.sh            # writes bench.md, r1-1.5b.log and r1-1.5b-fsdp.log under $OUT (default /tmp/nanobridge-gpu)
# 1. bench.py on CUDA: bf16 decode against transformers (tiny, 0.5B, 1.5B shapes), the GRPO step, and the peak
#    memory of one GRPO update at 4,096 tokens (chunked head + checkpointing against the full-logits head).
# 2. 2 GRPO steps of the paper's 1.5B recipe (config/r1_distill_qwen15b.py: width 4, 4,096 new tokens, bf16
#    autocast, chunked head, grad_checkpoint, KL reference) on a random model of DeepSeek-R1-Distill-Qwen-1.5B's
#    shape. A random model never stops early, so every row runs to 4,096 tokens: the worst case. train.py prints
#    its memory estimate first; each GRPO log line ends with the measured peak (mem), to compare.
# 3. The same under FSDP2 at world size 1 (bf16 gathered weights, fp32 reduce, sharded checkpoint and optimizer
#    state): a warm-up step (base weights frozen) then 2 GRPO steps, at 1,024 new tokens.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/nanobridge-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 bench.py --device=cuda --repeats=2 --trl=False --mem_tokens=4096 2>&1 | tee "$OUT/bench.md"
python3 - "$OUT" <<'PY'
import json, os, sys, torch
from model import ModelConfig, Transformer
import train
out = sys.argv[1]
ckpt = os.path.join(out, 'r1-1.5b-random')
cfg = ModelConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False, rope_theta=10000.0,
                  max_position_embeddings=131072, eos_token_id=151643)  # DeepSeek-R1-Distill-Qwen-1.5B's config.json
with torch.device('cuda'):
    Transformer(cfg).to(torch.bfloat16).cpu().save_pretrained(ckpt)  # random weights, bf16 on disk as the real one
train.write_byte_tokenizer(ckpt)  # any tokenizer will do: rewards are 0 for a random model anyway
with open(os.path.join(out, 'math.jsonl'), 'w') as f:
    for a in range(8):
        f.write(json.dumps({'problem': f'What is {a} + {a}?', 'solution': f'\\boxed{{{2 * a}}}'}) + '\n')
PY
python3 train.py config/r1_distill_qwen15b.py --init_from="$OUT/r1-1.5b-random" --data_train="$OUT/math.jsonl" \
    --data_test="$OUT/math.jsonl" --chat_template=plain --mode=grpo --grpo_steps=2 --batch_prompts=1 \
    --out_dir="$OUT/run" --save_every=1000 2>&1 | tee "$OUT/r1-1.5b.log"
torchrun --standalone --nproc_per_node=1 train.py config/r1_distill_qwen15b.py --fsdp=True \
    --init_from="$OUT/r1-1.5b-random" --data_train="$OUT/math.jsonl" --data_test="$OUT/math.jsonl" \
    --chat_template=plain --mode=warmup,grpo --warmup_steps=1 --warmup_problems=1 --grpo_steps=2 --batch_prompts=1 \
    --max_new_tokens=1024 --out_dir="$OUT/run-fsdp" --save_every=1000 2>&1 | tee "$OUT/r1-1.5b-fsdp.log"
rm -rf "$OUT/r1-1.5b-random" "$OUT/run" "$OUT/run-fsdp"
