# The paper's main base, DeepSeek-R1-Distill-Qwen-7B, on 8 GPUs with FSDP2: the 1.5B recipe (the
# Bridge warm-up on the base model's own correct GSM8K answers, GRPO of the full model + Bridge at
# width 4, dapo loss, KL term, long traces, the seven test sets), sharded. It holds what changes at
# 7B, so it follows that recipe on the line:
#   torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_qwen15b.py \
#       config/r1_distill_qwen7b.py --init_from=DIR
# In fp32 with AdamW the 7.8B parameters need ~117 GB for weights, gradients and optimizer state:
# DDP would hold all of it on every GPU, FSDP2 holds 1/8 per GPU.
if task != 'math':  # alone it would run the embedded task at 7B
    raise UserError("config/r1_distill_qwen7b.py follows config/r1_distill_qwen15b.py on the "
                    "command line")
out_dir = 'out-r1-qwen7b'
fsdp = True                 # each Block (its Bridge inside) is one FSDP unit;
                            # every rank still owns whole groups
bridge_dim = 512            # 4 heads x 128: 2.70% of the 7.6B base
                            # (the paper: 2.8-5.1% over its bases)
batch_prompts = 32          # 4 prompts per GPU: 128 rollouts per step
warmup_groups = 32          # 4 per GPU
probe = False               # the paper's evaluation only (compile is not wired up under FSDP2 yet)
