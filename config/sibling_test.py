# Does Bridge help where nothing forces it to? A pre-registered test (README, RESULTS.md): every row
# sees the same prompt and its siblings carry only their own attempts (a draft, then the final
# answer). Every setting below was committed before any comparison run; the task was chosen on
# RLVR-only runs alone (seeds 101-103, rule below), and no Bridge run was looked at before that
# choice was committed.
#
# Primary endpoint: mean accuracy at width 4, Bridge - RLVR-only, paired by seed, with its 95%
# t-interval over seeds 1-5. The smallest effect that would matter: 0.02. Everything else is
# secondary (widths 1, 8 and 16, majority vote, G-Pass, fix rate, width gain, the probe, Bridge -
# self-only, P-Match, the 3x length check).
# Task rule: among the candidates (sum3, mul, add with digits=3), keep the one with the largest
# headroom = majority vote at width 4 - accuracy at width 4, among those whose width-1 accuracy is
# in [0.3, 0.85] (means over the three selection seeds, RLVR-only); if none lands in range, change a
# candidate's digits and select again, still RLVR-only.
#
# Per seed S (1-5): one SFT model, shared by the four arms, on one core each, two runs side by side:
#   python train.py config/sibling_test.py --mode=sft,eval --out_dir=st/sft-S --seed=S --threads=1
#   python train.py config/sibling_test.py --init_from=st/sft-S/ckpt --out_dir=st/bridge-S \
#       --seed=S --threads=1
#   python train.py config/sibling_test.py --init_from=st/sft-S/ckpt --out_dir=st/rlvr-S --seed=S \
#       --threads=1 --use_bridge=False              # RLVR-only (its warm-up is skipped: nothing
#                                                   # to warm up)
#   ... --bridge_mode=self --out_dir=st/self-S      # the self-only control: Bridge's parameters,
#                                                   # no siblings
#   ... --bridge_mode=pmatch --out_dir=st/pmatch-S  # P-Match: the parameter-matched MLP
#   python compare.py --paired=True bridge='st/bridge-{seed}/eval_grpo.json' \
#       rlvr='st/rlvr-{seed}/eval_grpo.json' self='st/self-{seed}/eval_grpo.json' \
#       pmatch='st/pmatch-{seed}/eval_grpo.json' --seeds=1-5 --widths=1,4,8,16
# The length check: Bridge and RLVR-only again with --grpo_steps=900
# (out_dirs st/bridge3x-S, st/rlvr3x-S).
# Selection (RLVR-only, the whole run): python train.py config/sibling_test.py --task=T --digits=D
#   --use_bridge=False --mode=sft,eval,grpo,eval --seed=S --threads=1 --out_dir=st/select-T-D-S
mode = 'warmup,grpo,eval'
# the task, chosen by the rule above (RLVR-only, seeds 101-103; RESULTS.md has every candidate's
# figures): sum3 ended at width-1 accuracy 0.037 (below the range), add with 3 digits at 0.918
# (above), mul with 2 digits at 0.655, the only one in range (headroom 0.024): 'ab*c=' -> 'PPP;PPP',
# a draft product, then the final
task = 'mul'
digits = 2
# the embedded recipe, written out so that a later change of train.py's defaults cannot move
# this experiment
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
ffn = 336
bridge_dim = 64
bridge_heads = 4
sft_lr = 3e-3
sft_batch = 256
sft_steps = 1000
sft_horizon = 1000
# SFT stops at 0.6 held-out accuracy at T=1, or step 1,000
sft_target = 0.6
sft_temperature = 1.0
sft_eval_every = 50
# the paper's warm-up, set in advance (no Bridge run)
warmup_steps = 100
warmup_lr = 1e-3
warmup_groups = 16
warmup_problems = 512
warmup_samples = 8
warmup_temperature = 1.0
grpo_steps = 300
batch_prompts = 32
width = 4
lr = 3e-4
min_lr_ratio = 0.1
lr_warmup_iters = 10
temperature = 1.0
top_k = 0
top_p = 1.0
max_new_tokens = 16
loss_type = 'dapo'
beta = 0.0
num_iterations = 1
scale_rewards = 'group'
eval_widths = '1,4,8,16'
eval_samples = 16
eval_temperature = 1.0
eval_problems = 0
