"""DDP and ZeroRedundancyOptimizer with nnopt's fused AdamW, pruned layers (nnopt.prune and MaskedLinear) and the
ddp_prune example, on 2 real processes (gloo, CPU): one spawned job runs every check, to pay process start-up once.
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import nnopt.optim
from nnopt import distributed as nd
from nnopt.examples import ddp_prune
from nnopt.prune import RandomUnstructured, global_unstructured

from tests.distributed import _models as M
from tests.distributed._launch import launch, optim_backend


def _check_pruned(model):
    """Pruned weights, and their gradients after DDP's all-reduce, are exactly 0."""
    for (m, _), mask in zip(M.weights(model), M.masks(model)):
        assert (m.weight[~mask] == 0).all()
        assert m.weight.grad is None or (m.weight.grad[~mask] == 0).all()


def _ddp_job(rank, world, out):
    backend = optim_backend()
    ref, _, ref_masks = M.reference(masked_linear=True)

    # DDP: masks from the synchronised weights, identical on every rank without communication
    model = M.mlp(masked_linear=True)
    ddp = DistributedDataParallel(model, **ddp_prune.no_buffer_sync())
    opt = nnopt.optim.AdamW(model.parameters(), backend=backend, **M.OPT)
    made = []

    def on_prune():
        assert nd.masks_in_sync(model)
        M.assert_same_on_every_rank(M.masks(model), world)
        made.append([m.clone() for m in M.masks(model)])

    M.train(model, ddp, opt, rank, world, on_prune=on_prune, on_step=lambda: _check_pruned(model))
    M.assert_params_close(list(model.parameters()), list(ref.named_parameters()))
    for ours, theirs in zip(made, ref_masks, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    M.assert_same_on_every_rank(list(model.parameters()), world)

    # ZeroRedundancyOptimizer partitioning nnopt's AdamW (plain Linear layers, masks from nnopt.prune)
    ref, _, _ = M.reference()
    model = M.mlp()
    ddp = DistributedDataParallel(model, **ddp_prune.no_buffer_sync())
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=nnopt.optim.AdamW, backend=backend, **M.OPT)
    M.train(model, ddp, zero, rank, world, on_prune=lambda: M.assert_same_on_every_rank(M.masks(model), world),
            on_step=lambda: _check_pruned(model))
    M.assert_params_close(list(model.parameters()), list(ref.named_parameters()))
    assert isinstance(zero.optim, nnopt.optim.AdamW)
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        state = zero.state_dict()
        assert len(state["state"]) == len(list(model.parameters()))

    # Rank-local decisions (random pruning, different seeds) differ; sync_masks broadcasts rank 0's
    model = copy.deepcopy(model)
    torch.manual_seed(100 + rank)
    global_unstructured(M.weights(model), RandomUnstructured, amount=0.5)
    assert not nd.masks_in_sync(model)
    nd.sync_masks(model)
    assert nd.masks_in_sync(model)
    M.assert_same_on_every_rank(M.masks(model) + list(model.parameters()), world)

    # The example, on the process group already up
    result = ddp_prune.main(["--steps", "40", "--data", "synthetic", "--quiet", "--out", str(out / "ddp_prune.pt")])
    assert result["world"] == world and abs(result["sparsity"] - 0.9) < 0.01
    dist.barrier()


def test_ddp_zero_and_example_on_two_processes(tmp_path):
    launch(_ddp_job, 2, tmp_path)


def test_example_runs_as_one_process(tmp_path):
    result = ddp_prune.main(["--steps", "30", "--data", "synthetic", "--quiet", "--out", str(tmp_path / "c.pt")])
    assert result["world"] == 1 and abs(result["sparsity"] - 0.9) < 0.01
    assert (tmp_path / "c.pt").exists()
