"""Quantized (``state_bits`` 16/8/4) and compact optimizer states under FSDP2 (fully_shard) on 2 gloo processes.

Checked in one spawned job:
- a step on a DTensor parameter equals, on each rank, the single-process step on a plain tensor holding the rank's
  shard: parameters and every state tensor (codes, scales, kept_index) bitwise equal — uneven shards, every width,
  with masks and compact states, over steps where the masks change;
- FSDP2 training (global magnitude pruning, masks sharded with their parameters) equals the single-process training
  with the same states (the blocks align with the shards here) within fp32 tolerance;
- state layouts: DTensors sharded like the parameter (per-element states) or flat per rank (4-bit codes, scales);
- checkpoints mid-training: ``opt.state_dict()`` / ``load_state_dict`` and torch.distributed.checkpoint round trips
  continue bitwise identically; ``dequantized_state_dict`` gives fp32 DTensors that torch.optim.AdamW loads;
- bad input: a plain mask or an unsharded state on a DTensor parameter raises the documented error.
"""

import copy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

import nnopt.optim
from nnopt import sparsity
from nnopt.optim import dequantized_state_dict
from nnopt.optim._shard_state import ShardState, max_shard_numel
from nnopt.prune import L1Unstructured, global_unstructured

from tests.distributed import _models as M
from tests.distributed._launch import launch, optim_backend

# block 32 and min_quant_size 32: every weight is quantized, its shards start on block boundaries (rows of 12 and
# 16 elements, 8 rows per rank), the biases (16 or 3 elements, half per rank) keep fp32 states.
QUANT = dict(block_size=32, min_quant_size=32)
CONFIGS = {
    "8bit": dict(state_bits=8),
    "4bit": dict(state_bits=4),
    "16bit": dict(state_bits=16),
    "8bit-compact": dict(state_bits=8, compact_states=True),
    "16bit-compact": dict(state_bits=16, compact_states=True),
}


def _opt(params, cfg):
    return nnopt.optim.AdamW(params, backend=optim_backend(), **M.OPT, **dict(QUANT, **cfg))


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


class _Twin:
    """Plain tensors holding this rank's shards, each with the shard of its parameter's mask, and an optimizer of
    the same configuration over them: the single-process step on the same shards. (min_quant_size is read on the
    largest shard of a DTensor parameter, so that every rank picks the same format: the twins get it decided;
    compact states are the rank's own, their format read on the rank's packed vector as in one process.)"""

    def __init__(self, params, cfg):
        self.params = list(params)
        self.twins = [p.to_local().detach().clone() for p in self.params]
        self.least = dict(QUANT, **cfg)["min_quant_size"]
        self.compact = cfg.get("compact_states", False)
        groups = [{"params": [q], "min_quant_size": 0 if max_shard_numel(p) >= self.least else 2**40}
                  for p, q in zip(self.params, self.twins)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compact_states before any mask exists
            self.opt = _opt(groups, cfg)
        self.sync_masks()

    def sync_masks(self):
        for p, q, group in zip(self.params, self.twins, self.opt.param_groups):
            mask = sparsity.get_mask(p)
            if mask is not None:
                sparsity.set_mask(q, mask.to_local().clone())
                if self.compact:
                    group["min_quant_size"] = self.least

    def step(self):
        for p, q in zip(self.params, self.twins):
            q.grad = None if p.grad is None else p.grad.to_local().clone()
        self.opt.step()

    def assert_equal(self, opt, what):
        for j, (p, q) in enumerate(zip(self.params, self.twins)):
            assert torch.equal(p.to_local(), q), f"{what}: parameter {j} differs from the single-process step"
            want = self.opt.state[q]
            got = opt.state[p] if "kept_index" in want else ShardState(opt.state[p], p, what)
            assert set(want) <= set(opt.state[p]), (what, j, sorted(want), sorted(opt.state[p]))
            for key, value in want.items():
                assert torch.equal(got[key], value), f"{what}: state {key!r} of parameter {j} differs"


def _train(model, opt, rank, world, twin=None, steps=None, on_step=None):
    """M.train's loop (the same batches and pruning) with a twin stepped alongside."""
    for i, (x, y) in enumerate(M.batches()[:steps]):
        if i in M.PRUNE:
            global_unstructured(M.weights(model), L1Unstructured, amount=M.PRUNE[i])
            if twin is not None:
                twin.sync_masks()
        _step(model, opt, x, y, rank, world, twin)
        if on_step is not None:
            on_step(i)


def _step(model, opt, x, y, rank, world, twin=None):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    opt.step()
    if twin is not None:
        twin.step()
        twin.assert_equal(opt, "step")


def _uneven_shards(mesh, rank):
    """A [13, 37] parameter (row shards of 259 and 222 elements: no block boundary between them in one process;
    column shards, as tensor parallelism makes, of 13 x 19 and 13 x 18) with a mask, three steps of fresh
    gradients, for every width, full and compact states, bf16 with fp32 masters; GradScaler's inputs on the last
    cases (the second step is skipped as non-finite: nothing changes)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(7)
    full = torch.randn(13, 37, generator=gen)
    mask = torch.rand(13, 37, generator=gen) > 0.4
    grads = [torch.randn(13, 37, generator=gen) for _ in range(3)]
    cases = [(cfg, 0, torch.float32) for cfg in CONFIGS.values()] + [
        (dict(state_bits=4, block_size=64, min_quant_size=300), 0, torch.float32),
        (dict(state_bits=8), 1, torch.float32), (dict(state_bits=4), 1, torch.float32),
        (dict(state_bits=8, compact_states=True), 1, torch.float32),
        (dict(state_bits=8, master_weights=True), 0, torch.bfloat16),
        (dict(state_bits=4, master_weights=True, compact_states=True), 1, torch.bfloat16)]
    for cfg, dim, dtype in cases:
        what = f"{cfg}, Shard({dim}), {dtype}"
        p = torch.nn.Parameter(distribute_tensor((full * mask).to(dtype), mesh, [Shard(dim)]))
        sparsity.set_mask(p, distribute_tensor(mask, mesh, [Shard(dim)]))
        opt = _opt([p], cfg)
        twin = _Twin([p], cfg)
        scaled = cfg.get("master_weights", False)
        for j, g in enumerate(grads):
            p.grad = distribute_tensor(g.to(dtype), mesh, [Shard(dim)])
            if scaled:  # what GradScaler.step sets (the gradients were multiplied by grad_scale)
                for o in (opt, twin.opt):
                    o.grad_scale, o.found_inf = torch.tensor(4.0), torch.tensor(float(j == 1))
            before = p.to_local().clone()
            opt.step()
            twin.step()
            twin.assert_equal(opt, what)
            if scaled and j == 1:
                assert torch.equal(p.to_local(), before), what
        st = opt.state[p]
        if cfg["state_bits"] == 4 and not cfg.get("compact_states"):
            # min_quant_size reads the largest shard (259 elements): the same format on both ranks
            quantized = cfg.get("min_quant_size", 32) <= 259
            assert (st["exp_avg"].dtype == torch.uint8) == quantized, cfg
        if cfg.get("compact_states"):
            assert not isinstance(st["exp_avg"], DTensor) and "kept_index" in st
        assert (p.to_local()[~mask.chunk(2, dim)[rank]] == 0).all()
        # dequantized: fp32 states sharded like the parameter (compact ones expanded with zeros)
        dq = dequantized_state_dict(opt)["state"][0]
        for key in ("exp_avg", "exp_avg_sq"):
            assert dq[key].dtype == torch.float32 and dq[key].placements == p.placements, (what, key)
            assert (dq[key].to_local()[~mask.chunk(2, dim)[rank]] == 0).all(), (what, key)
        if cfg.get("master_weights"):
            assert dq["master_param"].placements == p.placements and dq["master_param"].shape == p.shape


def _layouts(model, opt, bits):
    """Per-element states are sharded like their parameter; 4-bit codes and scales are flat per rank."""
    from torch.distributed.tensor import DTensor, Shard

    w = model[2].weight  # [16, 16]: 128 elements per rank, 4 blocks of 32
    st = opt.state[w]
    for key, value in st.items():
        if key != "step":
            assert isinstance(value, DTensor) and value.device_mesh == w.device_mesh, key
    if bits == 16:
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg"].placements == w.placements
        return
    assert st["exp_avg_absmax"].placements == (Shard(0),) and st["exp_avg_absmax"].to_local().shape == (4,)
    if bits == 8:
        assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].placements == w.placements
        assert st["exp_avg"].shape == w.shape
    else:
        assert st["exp_avg"].placements == (Shard(0),) and st["exp_avg"].to_local().shape == (64,)
        assert st["exp_avg_absmax"].dtype == torch.bfloat16


def _logical(codes, p, world):
    """One process's codes of ``p`` from its DTensor codes: sharded like ``p`` (8 bits), or the used part of each
    rank's flat codes, in rank order (4 bits; the shards hold even numbers of elements)."""
    full = codes.full_tensor()
    if full.shape == p.shape:
        return full.reshape(-1)
    sizes = [c.numel() for c in torch.empty(p.shape, device="meta").chunk(world)]
    rows = full.view(world, -1)
    return torch.cat([rows[r, :(n + 1) // 2] for r, n in enumerate(sizes)])


def _against_one_process(mesh, rank, world, name, cfg):
    """FSDP2 training with a twin at every step, then the parameters against the single-process run."""
    torch.manual_seed(0)
    ref = M.mlp()
    ref_opt = _opt(ref.parameters(), cfg)
    M.train(ref, ref, ref_opt)

    model = _shard(M.mlp(), mesh)
    opt = _opt(model.parameters(), cfg)
    twin = _Twin(model.parameters(), cfg)
    _train(model, opt, rank, world, twin)
    full = [p.full_tensor() for p in model.parameters()]
    bits = cfg["state_bits"]
    if cfg.get("compact_states") and bits < 16:
        # each rank packs its own kept entries: its blocks are not one process's, the moments differ by the
        # quantization error; bound: a tenth of Adam's largest move (lr per step)
        for (n, want), got in zip(ref.named_parameters(), full):
            assert (got - want).abs().max() <= 0.1 * M.OPT["lr"] * M.STEPS, (name, n)
        return model, opt
    M.assert_params_close(full, list(ref.named_parameters()))
    if not cfg.get("compact_states"):
        _layouts(model, opt, bits)
        if bits < 16:  # the blocks align with the shards: one process's codes
            for p, q in zip(model.parameters(), ref.parameters()):
                for key in ("exp_avg", "exp_avg_sq"):
                    got, want = opt.state[p][key], ref_opt.state[q][key]
                    if want.dtype == torch.uint8:
                        assert torch.equal(_logical(got, p, world), want.reshape(-1)), (name, key)
        # the whole states equal the single-process ones within one code step (the gradients differ in rounding)
        dq = dequantized_state_dict(opt)["state"]
        want = dequantized_state_dict(ref_opt)["state"]
        for pid, s in dq.items():
            for key in ("exp_avg", "exp_avg_sq"):
                got, exp = s[key].full_tensor(), want[pid][key]
                step = 0.25 if cfg["state_bits"] == 4 else 0.02  # the maps' largest gaps, relative to the absmax
                assert (got - exp).abs().max() <= step * exp.abs().max() + 1e-7, (name, pid, key)
    return model, opt


def _round_trips(mesh, rank, world, out, cfg, tag):
    """Mid-training checkpoints (plain state_dict, then torch.distributed.checkpoint) continue bitwise. Compact
    states go through torch.distributed.checkpoint as dequantized_state_dict (their packed tensors are per rank):
    the continuation is then within the quantization error."""
    compact = cfg.get("compact_states", False)
    model = _shard(M.mlp(), mesh)
    opt = _opt(model.parameters(), cfg)
    _train(model, opt, rank, world, steps=4)  # both pruning steps done
    saved_params = [p.to_local().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        saved = copy.deepcopy(opt.state_dict())
    assert any("per-rank plain tensors" in str(w.message) for w in seen) == compact
    x, y = M.batches(M.STEPS + 1)[-1]
    _step(model, opt, x, y, rank, world)
    after = [p.to_local().clone() for p in model.parameters()]
    after_states = copy.deepcopy(opt.state_dict()["state"])

    # plain state_dict / load_state_dict on the same mesh, into a fresh optimizer of the same (restored) model
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved_params):
            p.to_local().copy_(v)
    again = _opt(model.parameters(), cfg)
    again.load_state_dict(copy.deepcopy(saved))  # (torch's loader keeps the fp32 tensors it is given)
    _step(model, again, x, y, rank, world)
    for j, (p, v) in enumerate(zip(model.parameters(), after)):
        assert torch.equal(p.to_local(), v), (tag, "state_dict", j)
    for pid, s in again.state_dict()["state"].items():
        for key, v in s.items():
            a, b = after_states[pid][key], v
            a, b = (a.to_local(), b.to_local()) if hasattr(a, "to_local") else (a, b)
            assert torch.equal(a, b), (tag, "state_dict", pid, key)

    # torch.distributed.checkpoint: save mid-training, load into a fresh sharded model and optimizer
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved_params):
            p.to_local().copy_(v)
    ckpt = _opt(model.parameters(), cfg)
    ckpt.load_state_dict(copy.deepcopy(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (compact: the warning checked above)
        msd, osd = get_state_dict(model, ckpt)
        dcp.save({"model": msd, "optim": dequantized_state_dict(ckpt) if compact else osd},
                 checkpoint_id=str(out / f"ckpt-{tag}"))
        fresh = _shard(M.mlp(seed=5), mesh)
        global_unstructured(M.weights(fresh), L1Unstructured, amount=0)  # the mask buffers must exist to be loaded
        fresh_opt = _opt(fresh.parameters(), cfg)
        msd, osd = get_state_dict(fresh, fresh_opt)
        if compact:
            osd = dequantized_state_dict(fresh_opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(out / f"ckpt-{tag}"))
        if compact:
            set_model_state_dict(fresh, msd)
            fresh_opt.load_state_dict(osd)
        else:
            set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd)
    _step(fresh, fresh_opt, x, y, rank, world)
    for j, (p, v) in enumerate(zip(fresh.parameters(), after)):
        if compact:  # requantized from fp32: within a small fraction of one Adam move
            assert (p.to_local() - v).abs().max() <= 0.05 * M.OPT["lr"], (tag, "dcp", j)
        else:
            assert torch.equal(p.to_local(), v), (tag, "dcp", j)
    if compact:
        return

    # dequantized: fp32 DTensors sharded like the parameters, loadable by torch.optim.AdamW
    dq = dequantized_state_dict(fresh_opt)
    torch_opt = torch.optim.AdamW(fresh.parameters(), **M.OPT)
    torch_opt.load_state_dict(dq)
    for p in fresh.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            s = torch_opt.state[p][key]
            assert s.dtype == torch.float32 and s.placements == p.placements and s.shape == p.shape
    # and back: fp32 DTensor states are quantized on load, shard by shard, within one code step of the saved ones
    requant = _opt(fresh.parameters(), cfg)
    with pytest.warns(UserWarning, match="converting state 'exp_avg' from 32-bit"):
        requant.load_state_dict(copy.deepcopy(dq))
    _layouts(fresh, requant, cfg["state_bits"])
    for pid, s in dequantized_state_dict(requant)["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = s[key].to_local(), dq["state"][pid][key].to_local()
            assert (got - want).abs().max() <= 0.25 * want.abs().max() + 1e-7, (tag, pid, key)
    _step(fresh, requant, x, y, rank, world)


def _bad_inputs(mesh, rank, world):
    from torch.distributed.tensor import distribute_tensor

    model = _shard(M.mlp(), mesh)
    for cfg in (dict(state_bits=8), dict(state_bits=8, compact_states=True)):
        opt = _opt(model.parameters(), cfg)
        w = model[0].weight
        setattr(w, sparsity._ATTR, torch.ones(w.shape, dtype=torch.bool))  # a plain mask on a DTensor parameter
        x, y = M.batches(1)[0]
        before = [p.to_local().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="the mask of parameter 0 of param group 0 must be a DTensor sharded"):
            _step(model, opt, x, y, rank, world)
        assert all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))  # nothing updated
        sparsity.set_mask(w, distribute_tensor(torch.ones(w.shape, dtype=torch.bool), mesh, w.placements))
        _step(model, opt, x, y, rank, world)
        sparsity.clear_mask(w)
    # an unsharded state (torch.optim's load_state_dict of a full checkpoint would leave one)
    opt = _opt(model.parameters(), dict(state_bits=8))
    _step(model, opt, x, y, rank, world)
    opt.state[model[0].weight]["exp_avg"] = torch.zeros(model[0].weight.shape, dtype=torch.uint8)
    opt._plans = {}
    with pytest.raises(ValueError, match="the exp_avg of a DTensor parameter .* is a plain tensor"):
        _step(model, opt, x, y, rank, world)


def _job(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    _uneven_shards(mesh, rank)
    for name, cfg in CONFIGS.items():
        _against_one_process(mesh, rank, world, name, cfg)
    for tag in ("8bit", "4bit", "8bit-compact"):
        _round_trips(mesh, rank, world, out, CONFIGS[tag], tag)
    _bad_inputs(mesh, rank, world)


def test_quantized_and_compact_states_under_fsdp2(tmp_path):
    launch(_job, 2, tmp_path, timeout=150)
