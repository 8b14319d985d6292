# The paper's third base, DeepSeek-R1-Distill-Llama-8B, on 8 GPUs with FSDP2: the 1.5B recipe
# (the Bridge warm-up on the base model's own correct GSM8K answers, GRPO of the full model +
# Bridge at width 4, dapo loss, KL term, long traces, the seven test sets), sharded as for the 7B,
# which it follows on the line:
#   torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_qwen15b.py \
#       config/r1_distill_qwen7b.py config/r1_distill_llama8b.py --init_from=DIR
# Its tokenizer is Llama 3's, its chat format the same R1 one (a forced '<think>\n'). In fp32 with
# AdamW the 8.3B parameters need ~124 GB.
if not fsdp:  # alone it would run the embedded task, unsharded
    raise UserError("config/r1_distill_llama8b.py follows config/r1_distill_qwen15b.py and "
                    "config/r1_distill_qwen7b.py on the command line")
out_dir = 'out-r1-llama8b'
bridge_dim = 512            # 4 heads x 128: 3.34% of the 8.0B base
                            # (the paper: 2.8-5.1% over its bases)
