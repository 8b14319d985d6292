# The paper's recipe on its smallest base, DeepSeek-R1-Distill-Qwen-1.5B, on one GPU: Bridge warm-up, then GRPO of
# the full model + Bridge at width 4 with the token-level (dapo) loss and a KL term, long reasoning traces.
#   python train.py config/r1_distill_qwen15b.py --init_from=DIR --data_train=math_train.jsonl \
#       --data_test=aime24.jsonl --test_keys=problem,answer
# DIR is the HF checkpoint directory (config.json, safetensors, tokenizer.json, tokenizer_config.json): its own
# DeepSeek chat template is used, which ends the prompt with a forced '<think>\n'. train.py prints its memory
# estimate before it starts and stops if the run cannot fit (see the README for 80 GB and 24 GB GPUs).
out_dir = 'out-r1-qwen1.5b'
mode = 'warmup,grpo,eval'
task = 'math'               # {problem, solution with \boxed{}}; 'gsm8k' reads {question, answer '#### n'}
instruction = ' Please reason step by step, and put your final answer within \\boxed{}.'  # DeepSeek's advice: no system prompt
bridge_dim = 512            # 4 heads x 128: 4.96% of the 1.5B base (the paper: 2.8-5.1%)
bridge_heads = 4
width = 4                   # the paper's training width (tested at 1-16)
batch_prompts = 8           # 32 rollouts per step on one GPU
micro_groups = 1            # one group (4 rows x up to ~4.3k tokens) per gradient micro-batch
max_new_tokens = 4096       # the paper does not give its response length: 4,096 is our choice (DeepScaleR starts at 8k)
temperature = 0.6           # DeepSeek's recommended sampling for these models (the paper's is not known)
top_p = 1.0                 # no truncation: the log-probs of the loss are those of the sampling distribution
eval_temperature = 0.6
loss_type = 'dapo'          # "a token-level normalized variant" (DAPO), as the paper says
beta = 0.001                # the paper has a KL term; its weight is not known. The reference model costs 4 B/param
lr = 1e-6
min_lr = 1e-7
warmup_iters = 5
grpo_steps = 500
warmup_lr = 1e-4            # Bridge-only warm-up on the model's own correct answers
warmup_steps = 50
warmup_problems = 8
dtype = 'bfloat16'          # fp32 master weights, bf16 autocast
grad_checkpoint = True      # stored activations: ~145 KB per token per layer without it, 6 KB with it (1.5B, bf16)
logprob_chunk = 1024        # the vocabulary head in chunks of 1,024 tokens: ~1.9 GB, whatever the trace length
eval_widths = '1,2,4,8,16'
eval_problems = 64
eval_samples = 16
save_every = 25
