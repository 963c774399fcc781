"""FSDP2 (fully_shard) with nnopt's fused AdamW on DTensor shards: global magnitude selection across shards,
training equal to one process, masks sharded with their parameters, and a torch.distributed.checkpoint saved on
2 ranks then loaded by 1 process that continues identically. One spawned job runs every sharded check."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import nnopt.optim
from nnopt import backends
from nnopt import distributed as nd
from nnopt.prune import L1Unstructured, apply_mask, global_unstructured
from nnopt.prune._select import kth_smallest

from tests.distributed import _models as M
from tests.distributed._launch import launch, optim_backend


def _selection_matches_one_process(mesh):
    """kth_smallest over Shard(0) DTensors equals it over the whole tensors: uneven shards, an empty shard,
    ties, masks, both orders (value and magnitude)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (1, 9), (3, 4), (6,)]
    full = [(torch.randn(s, generator=gen) * 4).round() / 4 for s in shapes]
    masks = [torch.rand(s, generator=gen) > 0.3 if i % 2 else None for i, s in enumerate(shapes)]
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    sharded_masks = [distribute_tensor(m, mesh, [Shard(0)]) if m is not None else None for m in masks]
    n = sum(int(m.sum()) if m is not None else t.numel() for t, m in zip(full, masks))
    rank, world = dist.get_rank(), dist.get_world_size()
    pieces = [t.reshape(-1)[rank::world] for t in full]  # plain tensors: this rank's pieces of a list, with group=
    piece_masks = [m.reshape(-1)[rank::world] if m is not None else None for m in masks]
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        for magnitude in (False, True):
            want = kth_smallest(full, masks, k, magnitude=magnitude)
            assert kth_smallest(sharded, sharded_masks, k, magnitude=magnitude) == want, (k, magnitude)
            got = kth_smallest(pieces, piece_masks, k, magnitude=magnitude, group=dist.group.WORLD)
            assert got == want, (k, magnitude, "group")
    with pytest.raises(ValueError, match=f"k={n + 1} exceeds"):  # every rank raises: the count is global
        kth_smallest(sharded, sharded_masks, n + 1)


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(model, opt, x, y, rank, world):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    opt.step()


def _launches(opt, fn):
    """The kernel calls (number of local tensors each) one ``fn()`` makes ``opt`` issue."""
    impl = backends.implementation("fused_optim", backends.resolve("fused_optim", opt.param_groups[0]["backend"]))
    calls, original = [], impl.adam_step

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return original(params, *args, **kwargs)

    impl.adam_step = counting
    try:
        fn()
    finally:
        impl.adam_step = original
    return calls


def _pruned_before_sharding(mesh, rank, world):
    """Masks made before fully_shard become DTensors sharded like their parameters (nd.shard_masks), and a
    sharded step keeps the pruned entries at 0."""
    from torch.distributed.tensor import DTensor

    model = M.mlp()
    global_unstructured(M.weights(model), L1Unstructured, amount=0.5)
    want = [m.clone() for m in M.masks(model)]
    model = nd.shard_masks(_shard(model, mesh))
    opt = nnopt.optim.AdamW(model.parameters(), backend=optim_backend(), **M.OPT)
    x, y = M.batches(1)[0]
    _step(model, opt, x, y, rank, world)
    for mask, expected, (m, _) in zip(M.masks(model), want, M.weights(model)):
        assert isinstance(mask, DTensor) and torch.equal(mask.full_tensor(), expected)
        assert (m.weight.full_tensor()[~expected] == 0).all()
    # a state left unsharded (torch.optim's load_state_dict of a full checkpoint would do that) is refused
    opt.state[model[0].weight]["exp_avg"] = torch.zeros(model[0].weight.shape)
    with pytest.raises(ValueError, match="the exp_avg of a DTensor parameter .* is a plain tensor"):
        _step(model, opt, x, y, rank, world)


def _fsdp_job(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    _selection_matches_one_process(mesh)
    _pruned_before_sharding(mesh, rank, world)

    # Quantized weights: the first magnitude pruning meets exact ties, resolved across shards as in one process.
    ref, _, ref_masks = M.reference(quantize=True)
    model = _shard(M.mlp(quantize=True), mesh)
    opt = nnopt.optim.AdamW(model.parameters(), backend=optim_backend(), **M.OPT)
    made = []

    def on_prune():
        for mask, (m, _) in zip(M.masks(model), M.weights(model)):
            assert isinstance(mask, DTensor) and mask.placements == m.weight.placements
        made.append([_full(m) for m in M.masks(model)])  # full_tensor(): every rank gets the same whole mask
        M.assert_same_on_every_rank(made[-1], world)

    def on_step():
        for mask, (m, _) in zip(M.masks(model), M.weights(model)):
            assert (m.weight.to_local()[~mask.to_local()] == 0).all()
        st = opt.state[model[0].weight]
        assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].placements == model[0].weight.placements

    M.train(model, model, opt, rank, world, on_prune=on_prune, on_step=on_step)
    for ours, theirs in zip(made, ref_masks, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    full_params = [_full(p) for p in model.parameters()]
    M.assert_params_close(full_params, list(ref.named_parameters()))

    # torch.distributed.checkpoint: save on 2 ranks, then one more step, whose result the 1-process load must match
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "ckpt"))
    x, y = M.batches(M.STEPS + 1)[-1]
    # one kernel call per group of local shards: the masked weights, the unmasked biases
    assert _launches(opt, lambda: _step(model, opt, x, y, rank, world)) == [3, 3]
    after = {name: _full(p) for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": after, "x": x, "y": y}, out / "next.pt")

    # load on 2 ranks into a fresh sharded model (all-True masks, so the buffers exist) and take the same step
    fresh = _shard(M.mlp(seed=5), mesh)
    global_unstructured(M.weights(fresh), L1Unstructured, amount=0)
    fresh_opt = nnopt.optim.AdamW(fresh.parameters(), backend=optim_backend(), **M.OPT)
    msd, osd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(out / "ckpt"))
    set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd)
    _step(fresh, fresh_opt, x, y, rank, world)
    for (name, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), name
    dist.barrier()


def test_fsdp2_on_two_processes_then_load_on_one(tmp_path):
    launch(_fsdp_job, 2, tmp_path)

    # One process, no process group: a model pruned like the saved one (the mask buffers must exist to be loaded)
    model = M.mlp()
    for m, name in M.weights(model):
        apply_mask(m, name, torch.ones_like(m.weight, dtype=torch.bool))
    opt = nnopt.optim.AdamW(model.parameters(), **M.OPT)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    assert not all(bool(m.all()) for m in M.masks(model))
    assert all(float(opt.state[p]["step"]) == M.STEPS for p in model.parameters())

    saved = torch.load(tmp_path / "next.pt", weights_only=True)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(saved["x"]), saved["y"]).backward()
    opt.step()
    M.assert_params_close(list(model.parameters()), list(saved["params"].items()))
    for (m, _), mask in zip(M.weights(model), M.masks(model)):
        assert (m.weight[~mask] == 0).all()
