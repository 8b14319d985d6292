# The paper's five non-math transfer benchmarks, evaluation only: a checkpoint trained on math
# alone, tested on multiple choice science (GPQA Diamond), logic grids (ZebraLogic), arithmetic
# search (Countdown) and news summarisation (XSum, CNN/DailyMail: ROUGE-1). Named after a base
# config, which it overrides:
#   python train.py config/r1_distill_qwen15b.py config/r1_transfer.py \
#       --init_from=out-r1-qwen1.5b/ckpt --out_dir=out-r1-qwen1.5b-transfer
# Each set names its grader after its path (tasks.GRADERS): its own prompt format, no
# boxed-answer instruction. None of them enters the Avg, which is the seven math sets' alone. The
# data files are docs/paper-experiment.md's.
mode = 'eval'
data_test = ('gpqa=data/gpqa_diamond.jsonl:gpqa,zebralogic=data/zebralogic.jsonl:zebra,'
             'countdown=data/countdown_test.jsonl:countdown,xsum=data/xsum_500.jsonl:xsum,'
             'cnn_dm=data/cnn_dm_500.jsonl:cnn')
# 3,222 problems: 4 answers each at widths 1 and 4 (the training width) keep the four arms'
# evaluations to ~3.5 h of the protocol's plan on one H100 (16 answers at widths 1-16, as on
# the math sets: ~24 h)
eval_widths = '1,4'
eval_samples = 4
