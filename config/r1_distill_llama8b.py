# The paper's third base, DeepSeek-R1-Distill-Llama-8B, on 8 GPUs with FSDP2: the recipe of r1_distill_qwen15b.py
# (the Bridge warm-up on the base model's own correct GSM8K answers, GRPO of the full model + Bridge at width 4, dapo
# loss, KL term, long traces, the seven test sets), sharded as for the 7B. Its tokenizer is Llama 3's, its chat
# format the same R1 one (a forced '<think>\n'). In fp32 with AdamW the 8.3B parameters need ~124 GB.
#   torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_llama8b.py --init_from=DIR
#   WORLD_SIZE=8 python train.py config/r1_distill_llama8b.py --init_from=DIR --dry_run=True   # memory per rank
exec(open(os.path.join(os.path.dirname(__file__), 'config', 'r1_distill_qwen7b.py')).read())  # that recipe, then:
out_dir = 'out-r1-llama8b'
bridge_dim = 512            # 4 heads x 128: 3.34% of the 8.0B base (the paper: 2.8-5.1% over its bases)
