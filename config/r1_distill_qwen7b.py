# The paper's main base, DeepSeek-R1-Distill-Qwen-7B, on 8 GPUs with FSDP2: the recipe of r1_distill_qwen15b.py (the
# Bridge warm-up on the base model's own correct GSM8K answers, GRPO of the full model + Bridge at width 4, dapo loss,
# KL term, long traces, the seven test sets), sharded. In fp32 with AdamW the 7.8B parameters need ~117 GB for
# weights, gradients and optimizer state: DDP would hold all of it on every GPU, FSDP2 holds 1/8 per GPU.
#   torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_qwen7b.py --init_from=DIR
#   WORLD_SIZE=8 python train.py config/r1_distill_qwen7b.py --init_from=DIR --dry_run=True   # memory per rank
exec(open(os.path.join(os.path.dirname(__file__), 'config', 'r1_distill_qwen15b.py')).read())  # that recipe, then:
out_dir = 'out-r1-qwen7b'
fsdp = True                 # each Block (its Bridge inside) is one FSDP unit; every rank still owns whole groups
bridge_dim = 512            # 4 heads x 128: 2.70% of the 7.6B base (the paper: 2.8-5.1% over its bases)
batch_prompts = 32          # 4 prompts per GPU: 128 rollouts per step
warmup_groups = 32          # 4 per GPU
probe = False               # the paper's evaluation only (compile is not wired up under FSDP2 yet)
