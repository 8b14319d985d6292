# A real checkpoint: Qwen2.5-Coder-0.5B-Instruct (built offline by ../shared/assets/real-qwen.sh) on
# GSM8K-format JSONL (../shared/assets/gsm-jsonl.sh). Paper recipe: Bridge warm-up, then GRPO of
# the full model + Bridge at width 4 with token-level (dapo) loss. Sized for one GPU; on CPU (as
# the slow test does) add
#   --mode=grpo --grpo_steps=2 --batch_prompts=2 --max_new_tokens=24
#   export NANOBRIDGE_REAL_CKPT=$(../shared/assets/real-qwen.sh)
#   DATA=$(../shared/assets/gsm-jsonl.sh)
#   python train.py config/qwen05b_gsm.py --init_from=$NANOBRIDGE_REAL_CKPT \
#       --data_train=$DATA/train.jsonl --data_test=$DATA/test.jsonl
import os
init_from = os.environ.get('NANOBRIDGE_REAL_CKPT', '')
out_dir = 'out-qwen05b'
mode = 'warmup,grpo,eval'
task = 'gsm8k'
bridge_dim = 512            # the paper-scale Bridge: 4 heads x 128 (8.9% of this small 0.5B host)
bridge_heads = 4
width = 4                   # the paper's training width
batch_prompts = 16
max_new_tokens = 384        # GSM answers need room: a truncated
                            # answer scores 0 (watch the trunc column)
temperature = 1.0
lr = 1e-6
min_lr_ratio = 0.1          # the cosine ends at 1e-7
lr_warmup_iters = 5
warmup_lr = 1e-4
warmup_steps = 20
warmup_problems = 64        # the warm-up set: 64 training problems,
                            # 8 answers each, from the base model
warmup_groups = 4
grpo_steps = 200
micro_groups = 1            # one group (4 rows) per gradient micro-batch
beta = 0.0
eval_widths = '1,2,4,8'
eval_problems = 64          # the first 64 test problems (0 = all): the card of every result says so
eval_samples = 8
save_every = 20
