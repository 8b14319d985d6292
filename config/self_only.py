# The self-only control: Bridge's parameters and recipe, but each row attends only to itself. It
# separates "extra parameters" from "reading siblings": if Bridge beats RLVR-only but not this,
# siblings are not the reason.
#   python train.py config/self_only.py
out_dir = 'out-self'
bridge_mode = 'self'
