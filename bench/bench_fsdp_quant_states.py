"""AdamW with quantized states on FSDP2-style DTensor parameters (Shard(0) over 2 gloo processes) against the same
optimizer on plain tensors holding the rank's shards: step time and state bytes per parameter, side by side.

Model: ``tensors`` weights of [d, d], each a DTensor sharded by rows over the 2 ranks (FSDP2's layout), with
synthetic gradients (the optimizer step alone is timed). Providers per rank, timed round-robin
(harness.time_providers), one torch thread per rank: nnopt AdamW at 32 / 8 / 4 bits on the DTensors, and at 32 / 8
bits on plain copies of the local shards (what the DTensor path costs over the kernels themselves). Before timing,
one 8-bit step on the DTensors is checked to give the plain step's parameters and codes bitwise. State bytes are
measured from the local tensors in ``opt.state`` (padding of the flat per-rank layouts included).

    python bench/bench_fsdp_quant_states.py [--tensors 16] [--d 1024] [--no-record]
"""

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness

import nnopt.optim as nno


def _local_bytes(opt):
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def _rank(rank, world, port, tensors, d, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = [torch.randn(d, d) * 0.02 for _ in range(tensors)]
    grads = [torch.randn(d, d) * 1e-3 for _ in range(tensors)]

    def sharded():
        ps = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in full]
        for p, g in zip(ps, grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        return ps

    def plain():
        ps = [torch.nn.Parameter(w.chunk(world)[rank].clone()) for w in full]
        for p, g in zip(ps, grads):
            p.grad = g.chunk(world)[rank].clone()
        return ps

    # check: one 8-bit step on the shards equals the plain step on the same shards (parameters and codes)
    a, b = sharded(), plain()
    oa, ob = nno.AdamW(a, lr=1e-3, state_bits=8), nno.AdamW(b, lr=1e-3, state_bits=8)
    oa.step()
    ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p.to_local(), q)
        assert torch.equal(oa.state[p]["exp_avg"].to_local(), ob.state[q]["exp_avg"])

    providers, opts = {}, {}
    for name, make, bits in [("DTensor fp32", sharded, 32), ("DTensor 8-bit", sharded, 8),
                             ("DTensor 4-bit", sharded, 4), ("plain fp32", plain, 32), ("plain 8-bit", plain, 8)]:
        ps = make()
        opts[name] = opt = nno.AdamW(ps, lr=1e-3, state_bits=bits)
        opt.step()
        providers[name] = opt.step
    times = harness.time_providers(providers, "cpu", repeats=9, inner=2, warmup=1)
    local_params = sum(w.chunk(world)[rank].numel() for w in full)
    if rank == 0:
        torch.save({"times": times, "bytes": {k: _local_bytes(o) / local_params for k, o in opts.items()},
                    "local_params": local_params}, out)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_rank, args=(2, port, args.tensors, args.d, out), nprocs=2, start_method="spawn")
        res = torch.load(out)
    t, by = res["times"], res["bytes"]
    rows = [{"provider": k, "ms / step (rank 0)": t[k] * 1e3, "vs DTensor fp32": t["DTensor fp32"] / t[k],
             "vs plain same bits": (t["plain 8-bit"] / t[k]) if "8-bit" in k else
             (t["plain fp32"] / t[k]) if "fp32" in k else "", "state B/param": by[k]} for k in t]
    body = (f"{args.tensors} weights of [{args.d}, {args.d}] ({args.tensors * args.d * args.d / 1e6:.1f}M parameters) "
            f"as Shard(0) DTensors over 2 gloo ranks, {res['local_params'] / 1e6:.1f}M per rank, one torch thread "
            "per rank; optimizer step only (synthetic gradients); medians of 9 interleaved samples of 2 steps. "
            "Check passed: one 8-bit step on the DTensors equals the plain step on the same shards (parameters and "
            f"codes bitwise). Machine shared with other engineers' jobs (load average {os.getloadavg()[0]:.1f} on "
            "2 cores at the end of the run).\n\n" + harness.table(rows, list(rows[0])))
    print(body)
    if not args.no_record:
        harness.append_results("bench_fsdp_quant_states: quantized AdamW states on FSDP2 DTensor shards", body)


if __name__ == "__main__":
    main()
