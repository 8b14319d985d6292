# The paper's P-Match ablation: a zero-initialised MLP after each FFN with Bridge's parameter count
# and no cross-row mixing, trained with the same recipe.
#   python train.py config/pmatch.py
out_dir = 'out-pmatch'
bridge_mode = 'pmatch'
