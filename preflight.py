"""
What train.py checks before its first step, so that a bad data line, a prompt that does not fit the
context or a stage that does not fit the device stops the run at start, not after hours of
training: every data set read (the warm-up's too), every prompt rendered and measured, the memory
of every stage estimated (memory.py) and, with --plan_gpu, each stage's time planned (plan.py).
"""
import plan
import settings
from memory import check_run
from tasks import prompt_lengths, read_groups, read_jsonl

def check(model, bridge, task, tok, run, stages, ranks, device, bf16):
    """-> (the warm-up's given data: its problems or groups, or [] to use the training set; the
    longest prompt of every set in tokens; the bytes each sampling call may fill, memory.py's
    rooms). run: train.py's settings; bridge: the BridgeConfig the model will have, or None."""
    warm = []
    if 'warmup' in stages and run['warmup_set']:
        warm = read_groups(run['warmup_set'])
    elif 'warmup' in stages and run['warmup_data']:
        warm = read_jsonl(run['warmup_data'])
    sets = {'the training set': task.train_set, **task.test_sets}
    if warm:
        sets['the warm-up data'] = warm
    lens = prompt_lengths(task, tok, sets, ranks.master)
    context = model.config.max_position_embeddings
    settings.check_data(run, context, lens, task.test_sets, ranks.master)
    sizes = {name: len(test) for name, test in task.test_sets.items()}
    sizes['the warm-up set'] = min(run['warmup_problems'], len(warm or task.train_set))
    gpu = run['plan_gpu']
    have = plan.device(gpu).memory if gpu else None
    peaks, rooms = check_run(model, bridge, run, ranks.world, lens, sizes, stages, bf16, device,
                             ranks.master, have)
    if gpu and ranks.master:
        plan.report(model.config, bridge, run, ranks.world, lens, sizes, stages, gpu, peaks)
    return warm, max(lens.values()), rooms
