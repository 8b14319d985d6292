# The RLVR-only baseline: the embedded default's exact recipe and budget (same SFT, same GRPO
# steps, same seeds), with no Bridge blocks and so no warm-up. Compare its eval_grpo.json with the
# default run's.
#   python train.py config/rlvr.py --out_dir=out-rlvr
out_dir = 'out-rlvr'
use_bridge = False
