# The paper's main base, DeepSeek-R1-Distill-Qwen-7B, on 8 GPUs with FSDP2: the recipe of r1_distill_qwen15b.py
# (Bridge warm-up, then GRPO of the full model + Bridge at width 4, dapo loss, KL term, long traces), sharded.
#   torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_qwen7b.py --init_from=DIR \
#       --data_train=math_train.jsonl --data_test=aime24.jsonl --test_keys=problem,answer
# DIR is the HF checkpoint directory (config.json, safetensors, tokenizer.json, tokenizer_config.json). In fp32 with
# AdamW the 7.8B parameters need ~117 GB for weights, gradients and optimizer state: DDP would hold all of it on
# every GPU, FSDP2 holds 1/8 per GPU. Add --dry_run=True to print the memory estimate per rank and stop (README).
out_dir = 'out-r1-qwen7b'
mode = 'warmup,grpo,eval'
fsdp = True                 # each Block (its Bridge inside) is one FSDP unit; every rank still owns whole groups
task = 'math'               # {problem, solution with \boxed{}}; 'gsm8k' reads {question, answer '#### n'}
instruction = ' Please reason step by step, and put your final answer within \\boxed{}.'  # DeepSeek's advice: no system prompt
bridge_dim = 512            # 4 heads x 128: 2.70% of the 7.6B base (the paper: 2.8-5.1% over its bases)
bridge_heads = 4
width = 4                   # the paper's training width (tested at 1-16)
batch_prompts = 32          # 4 prompts per GPU: 128 rollouts per step
micro_groups = 1            # one group (4 rows x up to ~4.3k tokens) per gradient micro-batch
max_new_tokens = 4096       # as for the 1.5B: our choice, the paper does not give its response length
temperature = 0.6           # DeepSeek's recommended sampling for these models
top_p = 1.0                 # no truncation: the log-probs of the loss are those of the sampling distribution
eval_temperature = 0.6
loss_type = 'dapo'          # "a token-level normalized variant" (DAPO), as the paper says
beta = 0.001                # the paper has a KL term; its weight is not known. The reference is sharded too
lr = 1e-6
min_lr = 1e-7
warmup_iters = 5
grpo_steps = 500
warmup_lr = 1e-4            # Bridge-only warm-up on the model's own correct answers
warmup_steps = 50
warmup_problems = 32        # 4 per GPU
dtype = 'bfloat16'          # fp32 master weights; FSDP gathers them in bf16 and reduces gradients in fp32
grad_checkpoint = True
logprob_chunk = 1024        # the vocabulary head in chunks of 1,024 tokens, whatever the trace length
eval_widths = '1,2,4,8,16'
eval_problems = 64
eval_samples = 16
save_every = 25
