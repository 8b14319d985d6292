# The positive control: a task that only sibling reading can solve, through the whole RL path.
# The environment writes 'd;' (d a random digit) and the stop token (generate's env hook: these
# tokens stay out of the loss), the policy writes only F, and the reward asks for F = the largest d
# of the group. SFT from scratch teaches the format with a self-only F (tasks.MaxDigit), and no row
# that sees only itself can beat the 'chance' column of the eval table (tasks.max_chance: 0.347 at
# width 4), so what GRPO adds above it comes from the siblings. About a minute on one core
# (README, Results):
#   python train.py config/positive_control.py                           # Bridge
#   python train.py config/positive_control.py --bridge_mode=self \
#       --out_dir=out-posctl-self                                        # the self-only control
out_dir = 'out-posctl'
task = 'maxdigit'
mode = 'sft,eval,grpo,eval'  # no warm-up: its groups keep only correct
                             # rows, here rows that share one digit
n_layer = 2
n_embd = 64
n_head = 4
n_kv_head = 2
ffn = 128
bridge_dim = 32
bridge_heads = 2
sft_lr = 3e-3                # the LR its recipe was confirmed at (fresh seeds 71-80)
sft_batch = 64
sft_target = 0.99            # greedy accuracy at width 1, where the answer is the row's own digit
sft_temperature = 0.0       # greedy: its SFT answers are random half the
                            # time on purpose, so T=1 never gets there
sft_eval_every = 25
sft_horizon = 3000           # the LR schedule's length: with 1,000,
                             # seed 1's GRPO never took off (README)
sft_steps = 6000             # the safety cap
max_new_tokens = 4           # 'd;F' and the stop token (a policy that wrote ';' and the stop
                             # itself sometimes broke the format, and groups that all get reward 0
                             # teach nothing)
grpo_steps = 1500            # sibling reading takes off after 100-300
                             # steps; training reward ~0.97 by step 600
batch_prompts = 32
lr = 1e-3
temperature = 1.2            # rollouts a little hotter: a stalled run had spent its entropy (0.05
                             # by step 430) before its group was read; at 1.2 it stays higher for
                             # longer (RESULTS.md: 9/10 fresh seeds 71-80 >= 0.95 at width 4,
                             # against 4/10 at 1.0). Evaluation stays at 1.0
