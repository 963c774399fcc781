"""Models, data and the training loop the distributed tests share, single-process and sharded alike."""

import torch
import torch.distributed as dist
from torch import nn

import nnopt.optim
from nnopt.nn import MaskedLinear
from nnopt import testing
from nnopt.prune import L1Unstructured, global_unstructured

BATCH = 8  # global batch; each of the ranks takes an equal share
PRUNE = {0: 0.5, 3: 0.4}  # step -> amount of the remaining weights pruned before that step
STEPS = 6
OPT = dict(lr=1e-2, weight_decay=1e-2)


def mlp(masked_linear=False, seed=0, quantize=False):
    """12 -> 16 -> 16 -> 3 (the middle layer a MaskedLinear when asked); ``quantize`` rounds the weights to
    multiples of 1/8, so magnitude pruning meets many exact ties."""
    torch.manual_seed(seed)
    middle = MaskedLinear(16, 16) if masked_linear else nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), middle, nn.ReLU(), nn.Linear(16, 3))
    if quantize:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 8).round() / 8)
    return model


def weights(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def masks(model):
    return [m._buffers["weight_mask"] for m, _ in weights(model)]


def batches(n=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 12, generator=gen), torch.randn(BATCH, 3, generator=gen)) for _ in range(n)]


def train(model, forward, opt, rank=0, world=1, on_prune=None, on_step=None, steps=None):
    """STEPS steps of MSE on each rank's share of the batches, pruning (global magnitude) at the PRUNE steps."""
    for i, (x, y) in enumerate(batches()[:steps]):
        if i in PRUNE:
            global_unstructured(weights(model), L1Unstructured, amount=PRUNE[i])
            if on_prune is not None:
                on_prune()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(forward(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        opt.step()
        if on_step is not None:
            on_step()


def reference(masked_linear=False, quantize=False, steps=None):
    """The single-process run on the whole batches: (model, optimizer, the masks made at each PRUNE step)."""
    model = mlp(masked_linear, quantize=quantize)
    opt = nnopt.optim.AdamW(model.parameters(), **OPT)
    made = []
    train(model, model, opt, on_prune=lambda: made.append([m.clone() for m in masks(model)]), steps=steps)
    return model, opt, made


def assert_params_close(got, want):
    """Equal to the single-process run up to the reduction order of the gradient (a sum over the batch)."""
    for (name, a), b in zip(want, got):
        testing.assert_close(b, a.detach(), reduction_length=BATCH, msg=f"{name} differs")


def assert_same_on_every_rank(tensors, world):
    """Every rank holds exactly the same tensors (compared bitwise after one all-gather)."""
    packed = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    for r, other in enumerate(gathered):
        assert torch.equal(other, packed), f"rank {r} holds other values"
