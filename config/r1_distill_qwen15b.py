# The paper's recipe on its smallest base, DeepSeek-R1-Distill-Qwen-1.5B, on one GPU: the Bridge
# warm-up (a set of the base model's own correct GSM8K answers, built once), then GRPO of the full
# model + Bridge at width 4 with the token-level (dapo) loss and a KL term, long reasoning traces,
# and the paper's seven test sets, each in full.
#   python train.py config/r1_distill_qwen15b.py --init_from=DIR    # DIR: the HF checkpoint
#                                                                   # (README: downloads)
#   python train.py config/r1_distill_qwen15b.py --init_from=DIR \
#       --dry_run=True                                              # the memory estimate only
# DIR holds config.json, the safetensors, tokenizer.json and tokenizer_config.json: its own DeepSeek
# chat template is used, which ends the prompt with a forced '<think>\n'. The data files are the
# README's conversions, in data/.
out_dir = 'out-r1-qwen1.5b'
mode = 'warmup,grpo,eval'   # the base model's table is its own run,
                            # once for every arm (--mode=eval: README)
task = 'math'               # JSONL, the layout read from each file:
                            # problem/solution, problem/answer, question/answer
data_train = 'data/math_train.jsonl'  # the RL problems (the paper's RL set
                                      # is not known: MATH's train split)
data_test = ('math500=data/math500.jsonl,aime24=data/aime24.jsonl,aime25=data/aime25.jsonl,'
             'amc23=data/amc23.jsonl,brumo25=data/brumo25.jsonl,cmimc25=data/cmimc25.jsonl,'
             'hmmt_feb25=data/hmmt_feb25.jsonl')
# DeepSeek's advice for these models: no system prompt, this instruction after the problem
instruction = ' Please reason step by step, and put your final answer within \\boxed{}.'
answer_fallback = False     # the last \boxed{} only: a trace cut
                            # mid-thought ends on a scratch number
bridge_dim = 512            # 4 heads x 128: 4.96% of the 1.5B base (the paper: 2.8-5.1%)
bridge_heads = 4
width = 4                   # the paper's training width (tested at 1-16)
batch_prompts = 8           # 32 rollouts per step on one GPU
micro_groups = 1            # one group (4 rows x up to ~4.3k tokens) per gradient micro-batch
max_new_tokens = 4096       # the paper does not give its response length:
                            # 4,096 is our choice (DeepScaleR starts at 8k)
temperature = 0.6           # DeepSeek's recommended sampling for
                            # these models (the paper's is not known)
top_p = 1.0                 # no truncation: the log-probs of the loss
                            # are those of the sampling distribution
eval_temperature = 0.6
loss_type = 'dapo'          # "a token-level normalized variant" (DAPO), as the paper says
beta = 0.001                # the paper has a KL term; its weight is not known.
                            # The reference model costs 4 B/param
lr = 1e-6
min_lr_ratio = 0.1          # the cosine ends at 1e-7
lr_warmup_iters = 5
grpo_steps = 500
warmup_data = 'data/gsm8k_train.jsonl'  # the paper's warm-up problems: GSM8K
warmup_problems = 7473      # all of GSM8K's train split, 8 answers each
                            # (the paper), at the rollout temperature
warmup_temperature = 0.6
warmup_steps = 100          # the warm-up's length, LR and batch are not known: ours
warmup_groups = 8
warmup_lr = 1e-4
dtype = 'bfloat16'          # fp32 master weights, bf16 autocast
grad_checkpoint = True      # stored activations: ~145 KB per token per layer
                            # without it, 6 KB with it (1.5B, bf16)
logprob_chunk = 1024        # the vocabulary head in chunks of 1,024 tokens:
                            # ~1.9 GB, whatever the trace length
eval_widths = '1,2,4,8,16'  # the paper's width sweep
eval_problems = 0           # every problem of every set (MATH-500's 500, AIME's 30 ...)
eval_samples = 16           # 16 rows per problem at every width: 16 groups of 1, 4 of 4, 1 of 16
probe = False               # the paper's evaluation only: no probe, so
                            # --compile=True can compile the decode step
save_every = 25
