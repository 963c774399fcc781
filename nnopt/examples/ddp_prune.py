"""Data-parallel training of a pruned MLP with nnopt: DDP, fused AdamW, global magnitude pruning, a checkpoint.

    torchrun --nproc-per-node 2 -m nnopt.examples.ddp_prune     # 2 processes: gloo on CPU, NCCL on GPUs
    python -m nnopt.examples.ddp_prune                          # 1 process, no torchrun

Each rank trains on its share of every batch and DDP averages the gradients, so the weights stay identical on
every rank. Global magnitude pruning (``nnopt.prune.global_unstructured``: one radix select over all the layers,
nothing concatenated) therefore makes the same masks on every rank from those weights: no mask is communicated,
and the example checks the claim with ``nnopt.distributed.masks_in_sync`` (one small all-reduce). Sparsity rises
to ``--sparsity`` in ``--prune-steps`` steps on a cubic schedule; nnopt's AdamW applies the masks inside its fused
kernel, so pruned weights and their Adam moments stay exactly zero. The hidden layer is an
``nnopt.nn.MaskedLinear``; DDP runs with ``broadcast_buffers=False`` because the only buffers are the masks, which
agree already (re-broadcasting them would cost one byte per weight every forward).

Rank 0 writes the checkpoint (model with its masks, optimizer, step) with ``torch.save``: the replicas are equal,
one copy is the whole state. ``nnopt.prune.restore`` loads it into a freshly built model, as the example checks.
(Sharded training, FSDP2, saves with ``torch.distributed.checkpoint`` instead: see tests/distributed/test_fsdp.py.)

Data: scikit-learn's bundled digits when scikit-learn is installed (``--data digits``), else a synthetic task
whose labels come from a random teacher network (``--data synthetic``).
"""

import argparse
import inspect
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import nnopt.optim
import nnopt.prune
from nnopt import distributed as nd
from nnopt.nn import MaskedLinear


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nnopt.examples.ddp_prune", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=int, default=128, help="global batch size, split across ranks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sparsity", type=float, default=0.9, help="final fraction of pruned weights")
    parser.add_argument("--prune-steps", type=int, default=4, help="pruning events, in the first 3/4 of training")
    parser.add_argument("--data", choices=("auto", "digits", "synthetic"), default="auto")
    parser.add_argument("--out", default="ddp_prune.pt", help="checkpoint path (written by rank 0)")
    parser.add_argument("--backend", default=None, help="nnopt backend of the optimizer (default: auto)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def setup():
    """(rank, world size, device, whether this call started the process group). Uses a process group that is
    already up, else torchrun's environment (NCCL with GPUs, gloo without), else runs as one process."""
    if dist.is_available() and dist.is_initialized():
        gpu = dist.get_backend() == "nccl"
        started = False
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if gpu else "gloo")
        started = True
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device, False
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device, started


def load_data(kind, device):
    """(x_train, y_train, x_test, y_test), float32 features [N, 64] and 10 classes; the same on every rank."""
    if kind in ("auto", "digits"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            if kind == "digits":
                raise ImportError("--data digits needs scikit-learn: pip install scikit-learn") from None
        else:
            data = load_digits()
            x = torch.tensor(data.data, dtype=torch.float32) / 16.0
            y = torch.tensor(data.target, dtype=torch.long)
            return _split(x, y, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=gen)
    teacher = [torch.randn(64, 32, generator=gen), torch.randn(32, 10, generator=gen)]
    logits = torch.relu(x @ teacher[0]) @ teacher[1]
    y = (logits - logits.mean(0)).argmax(1)  # centred per class: roughly balanced labels
    return _split(x, y, device)


def _split(x, y, device):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def no_buffer_sync():
    """DDP's argument that stops the per-forward buffer broadcast (renamed ``forward_sync_buffers`` in torch 2.13)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def make_model(device, seed=0):
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), MaskedLinear(128, 128), nn.ReLU(), nn.Linear(128, 10)).to(
        device)


def weights(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def sparsity(model):
    pairs = weights(model)
    zeros = sum(int((~m._buffers["weight_mask"]).sum()) for m, _ in pairs if "weight_mask" in m._buffers)
    return zeros / sum(m.weight.numel() for m, _ in pairs)


def schedule(final, events, steps):
    """{step: amount to prune of the remaining weights}: a cubic ramp to ``final`` over the first 3/4 of training."""
    plan, before = {}, 0.0
    for i in range(1, events + 1):
        target = final * (1 - (1 - i / events) ** 3)
        at = max(1, int(0.75 * steps * i / events))
        keep = (1 - target) / (1 - before) * (1 - plan.get(at, 0.0))  # events on one step (short runs) combine
        plan[at] = 1 - keep
        before = target
    return plan


@torch.no_grad()
def accuracy(model, x, y, rank, world):
    """Accuracy on the test split: each rank scores its share, one all-reduce sums the counts."""
    xs, ys = x[rank::world], y[rank::world]
    counts = torch.tensor([(model(xs).argmax(1) == ys).sum().item(), len(ys)], dtype=torch.float64,
                          device=x.device)
    if world > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def main(argv=None):
    """Runs the example; returns a dict of results (loss, accuracy, sparsity, checkpoint path, world size)."""
    args = parse_args(argv)
    rank, world, device, started = setup()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 and not args.quiet else (lambda *a: None)
    try:
        x, y, xt, yt = load_data(args.data, device)
        model = make_model(device)
        ddp = model
        if world > 1:
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync())
        opt = nnopt.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4, backend=args.backend)
        prune_at = schedule(args.sparsity, args.prune_steps, args.steps)
        gen = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its share
        log(f"ddp_prune: {world} process(es) on {device}, {args.steps} steps, target sparsity {args.sparsity}")
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(x), (args.batch,), generator=gen).to(device)[rank::world]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if step in prune_at:
                nnopt.prune.global_unstructured(weights(model), nnopt.prune.L1Unstructured, amount=prune_at[step])
                if world > 1 and not nd.masks_in_sync(model):
                    raise RuntimeError("ddp_prune: the ranks pruned different weights")
                log(f"step {step:4d}  loss {loss.item():.4f}  pruned to sparsity {sparsity(model):.3f}")
        acc = accuracy(model, xt, yt, rank, world)
        log(f"done in {time.perf_counter() - t0:.1f} s: loss {loss.item():.4f}, test accuracy {acc:.3f}, "
            f"sparsity {sparsity(model):.3f}")
        if rank == 0:  # the replicas are equal: rank 0 saves, and checks the checkpoint restores the model
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": args.steps}, args.out)
            ckpt = torch.load(args.out, map_location=device, weights_only=True)
            fresh = make_model(device, seed=1)
            nnopt.prune.restore(fresh, ckpt["model"])
            nnopt.optim.AdamW(fresh.parameters(), lr=args.lr, weight_decay=1e-4).load_state_dict(ckpt["optimizer"])
            if accuracy(fresh, xt, yt, 0, 1) != accuracy(model, xt, yt, 0, 1):
                raise RuntimeError("ddp_prune: the restored model scores differently from the trained one")
            log(f"checkpoint {args.out}: restored into a fresh model, same test accuracy")
        if world > 1:
            dist.barrier()
        return dict(loss=loss.item(), accuracy=acc, sparsity=sparsity(model), checkpoint=args.out, world=world)
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
