"""
Several processes, from outside the model: the process group and its sums (DDP by hand: every rank
owns whole Bridge groups, so summing gradients that are already normalised over the whole batch is
exact), FSDP2 sharding in torchtitan's layout, full state dicts for checkpoints, and how many CPU
threads a rank may use.
"""
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

def free_cores(seconds=0.3):
    """Cores idle right now, from two reads of /proc/stat. Oversubscribed BLAS threads run many
    times slower on a busy machine; the load average would lag by a minute (right after
    `pip install` it still counts pip)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    def total_idle():
        with open('/proc/stat') as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all jiffies, idle + iowait ones
    try:
        (t0, i0), _, (t1, i1) = total_idle(), time.sleep(seconds), total_idle()
    except OSError:  # no /proc (macOS): assume the machine is ours
        return cores
    return max(1, min(cores, round(os.cpu_count() * (i1 - i0) / max(t1 - t0, 1))))

class Ranks:
    """This process's place among the torchrun ranks (rank 0 of 1 without torchrun), read from the
    environment; connect() joins the process group. A dry run never connects:
    `WORLD_SIZE=8 python train.py --dry_run=True` prints what each of 8 ranks would need."""

    def __init__(self, device, fsdp=False):
        self.rank, self.world, self.fsdp = (int(os.environ.get('RANK', 0)),
                                            int(os.environ.get('WORLD_SIZE', 1)), fsdp)
        self.master, self.dev = self.rank == 0, device

    def connect(self):
        """Join the process group (under torchrun, or for FSDP); each rank takes its own GPU.
        Returns the device."""
        if self.world > 1 or self.fsdp:
            if self.dev.type == 'cuda':
                self.dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
                torch.cuda.set_device(self.dev)
            dist.init_process_group('nccl' if self.dev.type == 'cuda' else 'gloo')
        return self.dev

    def all_sum(self, *xs):
        """Python numbers summed over the ranks, in one all-reduce."""
        t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=self.dev)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def sync_grads(self, params):
        """DDP by hand: sum the gradients over the ranks (FSDP's reduce-scatter
        sums them itself)."""
        if self.world > 1 and not self.fsdp and dist.is_initialized():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                              for p in params])
            dist.all_reduce(flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p)

    def gather(self, items):
        """Every rank's list, concatenated in rank order, on every rank."""
        if not (dist.is_initialized() and self.world > 1):
            return list(items)
        out = [None] * self.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def close(self):
        if dist.is_initialized():
            # let every rank finish before gloo tears down (else a late rank can abort)
            dist.barrier()
            dist.destroy_process_group()
            # gloo's worker threads may still hold tensors while Python finalises, which can abort
            # a rank at exit (pytorch#179291, seen here under FSDP): everything is written, so
            # leave without finalising
            print(end='', flush=True)  # (stderr is line-buffered)
            os._exit(0)

# -----------------------------------------------------------------------------
# FSDP2 (train.py --fsdp=True under torchrun), in torchtitan's layout

def shard(model, world, bf16, train=True):
    """Each Block (its Bridge inside) is one FSDP unit, gathered for its forward and again for its
    backward; the embedding and [norm, lm_head] are units too (tied, all three are one: a weight
    lives in one unit), and the root holds the rest. Every rank still owns whole Bridge groups: only
    weights are split, never a batch."""
    # imported when used: ~0.6 s of every start
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32)
    kw = dict(mesh=init_device_mesh(model.lm_head.weight.device.type, (world,)), mp_policy=mp)
    for block in model.model.layers:
        fully_shard(block, **kw)
    head = [model.model.norm, model.lm_head]
    if model.config.tie_word_embeddings:
        head.insert(0, model.model.embed_tokens)
    else:
        fully_shard(model.model.embed_tokens, **kw)
    # backward needs the head first: keep it (torchtitan)
    fully_shard(head, reshard_after_forward=not train, **kw)
    fully_shard(model, **kw)
    # every loss here is normalised over all ranks' batch, so ranks' gradients are SUMMED
    for m in fsdp_units(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model

def fsdp_units(model):
    # imported by shard(): before it, nothing is sharded
    fsdp = sys.modules.get('torch.distributed.fsdp')
    return [m for m in model.modules() if fsdp and isinstance(m, fsdp.FSDPModule)]

def full_tensors(model):
    """The model's state_dict with every sharded tensor gathered whole, on every rank."""
    return {k: v.full_tensor() if hasattr(v, 'full_tensor') else v
            for k, v in model.state_dict().items()}

def full_state(model, opt=None, fsdp=False, load=None):
    """The model's state_dict, or with opt the optimizer's, or with load set the optimizer's
    to it. Under FSDP every rank takes part, and rank 0 receives the whole tensors (on CPU,
    one at a time) keyed by parameter name (the same HF checkpoint as without FSDP); loaded,
    each rank keeps its shard."""
    if not fsdp:
        return (model.state_dict() if opt is None else
                opt.state_dict() if load is None else opt.load_state_dict(load))
    from torch.distributed.checkpoint import state_dict as dcp
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=load is None)
    return (dcp.get_model_state_dict(model, options=full) if opt is None else
            dcp.get_optimizer_state_dict(model, opt, options=full) if load is None else
            dcp.set_optimizer_state_dict(model, opt, load, options=full))

@contextmanager
def gathered(model, fsdp):
    """Every unit gathered once, in the same order on every rank, for a whole rollout, evaluation or
    warm-up set, not once per layer per decoded token; sharded again after. Inside, a forward does
    no collective: ranks may make different numbers of sampling calls (problems that do not split
    evenly) and decode different numbers of steps."""
    units = fsdp_units(model) if fsdp else []
    if fsdp:
        model.set_reshard_after_forward(False)
    # explicitly: a rank with fewer calls (or none) must still join every all-gather
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:  # back to shard()'s layout (the head kept after forward), sharded
            m.set_reshard_after_forward(m is not model.lm_head, recurse=False)
            m.reshard()

def unfreeze_for_fsdp(model):
    """FSDP fixes a unit's gradient dtypes from requires_grad when it gathers: after changing
    requires_grad (a stage that trains other weights), gather once, or the next backward assigns
    bf16 gradients to fp32 weights."""
    for m in fsdp_units(model):
        m.unshard()
        m.reshard()
