"""Optimizer step benchmark: every nnopt backend against torch.optim's for-loop, foreach and fused modes, and
against the memory floor (bytes the step must move ÷ copy bandwidth measured in the same run).

Models: ``many`` — 1,207 tensors, 16.8M parameters (shapes of a small transformer stack: weights, biases,
norms, an embedding); ``large`` — the same parameter count in 4 tensors on CPU, ~1.07B parameters in 8 tensors
on CUDA. Real parameter sets, the parameters of ``transformers`` models built from their configs (on the meta
device: shapes only): ``tiny`` — a 2-layer GPT-2, 2.1M parameters in 28 tensors; ``llama`` — a Llama-style
8-layer model, 32.6M in 75 tensors; ``gpt2`` — GPT-2 small, 124.4M in 148 tensors. On the real sets only AdamW
runs, against torch's fused mode (its fastest). Each provider is checked against the reference (nnopt's torch
backend) before it is timed.

    python bench/bench_optim.py [--device cpu|cuda] [--models many,large,tiny,llama,gpt2] [--quick] [--no-record]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import nnopt.optim  # noqa: E402
from nnopt import backends, sparsity  # noqa: E402
from nnopt.testing import tolerance  # noqa: E402

# name, kwargs, bytes moved per parameter in fp32 (reads + writes), torch has fused?
OPTIMIZERS = [
    ("AdamW", dict(lr=1e-3, weight_decay=1e-2), 7 * 4, True),
    ("SGD", dict(lr=1e-2, momentum=0.9), 5 * 4, True),
    ("Adagrad", dict(lr=1e-2), 5 * 4, True),
    ("RMSprop", dict(lr=1e-3), 5 * 4, False),
]


def transformers_shapes(model):
    """The parameter shapes of a ``transformers`` model built from its config on the meta device (no weights)."""
    import transformers as t

    if model == "tiny":
        cls, cfg = t.GPT2LMHeadModel, t.GPT2Config(vocab_size=12000, n_embd=128, n_layer=2, n_head=4,
                                                   bos_token_id=0, eos_token_id=0)
    elif model == "gpt2":
        cls, cfg = t.GPT2LMHeadModel, t.GPT2Config()  # GPT-2 small
    else:
        cls, cfg = t.LlamaForCausalLM, t.LlamaConfig(vocab_size=24000, hidden_size=384, intermediate_size=1024,
                                                     num_hidden_layers=8, num_attention_heads=6,
                                                     num_key_value_heads=6, tie_word_embeddings=False)
    with torch.device("meta"):
        return [tuple(p.shape) for p in cls(cfg).parameters()]


REAL_MODELS = ("tiny", "llama", "gpt2")


def shapes(model, device, quick):
    if model in REAL_MODELS:
        return transformers_shapes(model)
    if model == "many":
        layers, d = (20, 32) if quick else (201, 128)
        per_layer = [(d, 2 * d), (2 * d,), (2 * d, d), (d,), (d,), (d,)]
        out = [s for _ in range(layers) for s in per_layer]
        out.append(((1000 if quick else 27343), d))  # embedding: brings the total to 16.8M in full size
        return out
    if torch.device(device).type == "cuda" and not quick:
        return [(8192, 16384)] * 8  # 1.07B parameters
    return [(1024, 1024)] * 4 if quick else [(2048, 2052)] * 4  # 16.8M parameters


def make_params(shape_list, device):
    gen = torch.Generator(device=device).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shape_list]
    for p in ps:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    return ps


def clone(ps):
    out = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, out):
        q.grad = p.grad  # gradients are read-only for every optimizer: share them
    return out


def providers_for(name, kwargs, has_fused, ps, device, masks=None, real=False):
    """{provider label: (step fn, params)} for one optimizer. On a real parameter set torch runs fused only (its
    fastest mode: for-loop and foreach are 3-40x slower there, and would dominate the run time on GPT-2 small)."""
    out = {}
    torch_cls = getattr(torch.optim, name)
    modes = [] if real else [("torch for-loop", dict(foreach=False)), ("torch foreach", dict(foreach=True))]
    if has_fused:
        modes.append(("torch fused", dict(fused=True)))
    for label, mode in modes:
        qs = clone(ps)
        opt = torch_cls(qs, **kwargs, **mode)
        if masks is None:
            out[label] = (opt.step, qs)
        else:
            def masked_step(opt=opt, qs=qs):
                opt.step()
                for q, m in zip(qs, masks):
                    q.detach().mul_(m)

            def masked_step_foreach(opt=opt, qs=qs):
                opt.step()
                torch._foreach_mul_([q.detach() for q in qs], masks)

            out[label + " + p.mul_(mask)"] = (masked_step, qs)
            if mode.get("fused"):
                qs2 = clone(ps)
                opt2 = torch_cls(qs2, **kwargs, **mode)
                out[label + " + _foreach_mul_"] = (lambda opt2=opt2, qs2=qs2: masked_step_foreach(opt2, qs2), qs2)
    for b in backends.BACKENDS:
        if backends.missing(b, device) is not None or b == "torch" or (b == "triton" and device == "cpu"):
            continue
        qs = clone(ps)
        if masks is not None:
            for q, m in zip(qs, masks):
                sparsity.set_mask(q, m)
        opt = getattr(nnopt.optim, name)(qs, backend=b, **kwargs)
        out[f"nnopt {b}"] = (opt.step, qs)
    return out


def check(provs, ps, name, kwargs, masks):
    """One step of each provider from the same start must match nnopt's reference (torch backend)."""
    ref = clone(ps)
    if masks is not None:
        for q, m in zip(ref, masks):
            sparsity.set_mask(q, m)
    getattr(nnopt.optim, name)(ref, backend="torch", **kwargs).step()
    rtol, atol = tolerance(torch.float32)
    for label, (step, qs) in provs.items():
        step()
        for q, r in zip(qs, ref):
            if not torch.allclose(q.detach(), r.detach(), rtol=rtol * 10, atol=atol * 10):
                raise AssertionError(f"{label} ({name}) disagrees with the reference after one step")


def run(device="cpu", models=("many", "large") + REAL_MODELS, quick=False, record=True, repeats=None):
    repeats = repeats or (5 if quick else 15)
    bw = harness.copy_bandwidth(device, nbytes=(64 << 20) if quick else None)
    bw_inplace = harness.inplace_bandwidth(device, nbytes=(64 << 20) if quick else None)
    print(f"device {device}: copy bandwidth {bw / 1e9:.1f} GB/s, in-place {bw_inplace / 1e9:.1f} GB/s "
          "(read + write)", flush=True)
    sections, summary = [], []
    for model in models:
        real = model in REAL_MODELS
        if real and quick and model != "tiny":
            continue  # quick mode: the tiny real set only
        try:
            shape_list = shapes(model, device, quick)
        except ImportError:
            print(f"  {model}: skipped (needs transformers: pip install transformers)", flush=True)
            continue
        ps = make_params(shape_list, device)
        n = sum(p.numel() for p in ps)
        cases = [(name, kwargs, nbytes, fused, None) for name, kwargs, nbytes, fused in OPTIMIZERS
                 if not real or name == "AdamW"]
        if not real:
            masks = [torch.rand(p.shape, device=device) > 0.5 for p in ps]
            cases.append(("AdamW", dict(lr=1e-3, weight_decay=1e-2), 7 * 4 + 1, True, masks))
        rows = []
        for name, kwargs, nbytes, fused, mk in cases:
            label = name + (" masked" if mk is not None else "")
            provs = providers_for(name, kwargs, fused, ps, device, mk, real=real)
            check(provs, ps, name, kwargs, mk)
            times = harness.time_providers({k: v[0] for k, v in provs.items()}, device, repeats=repeats)
            floor = n * nbytes / bw
            floor_inplace = n * nbytes / bw_inplace
            base = [t for k, t in times.items() if k.startswith("torch fused")]
            best_torch = min(t for k, t in times.items() if k.startswith("torch"))
            for k, t in times.items():
                rows.append({"optimizer": label, "provider": k, "ms/step": 1e3 * t, "x floor": t / floor,
                             "x in-place floor": t / floor_inplace,
                             "speedup vs torch fused": (min(base) / t) if base else "",
                             "speedup vs best torch": best_torch / t})
                if k.startswith("nnopt"):
                    summary.append((model, label, k, t / floor, t / floor_inplace,
                                    (min(base) / t) if base else None, best_torch / t))
            print(f"  {model:5s} {label:13s} " + "  ".join(f"{k}={1e3 * t:.2f}ms" for k, t in times.items()),
                  flush=True)
            provs = None  # free this case's copies before the next case builds its own (1B params on a GPU)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        cols = ["optimizer", "provider", "ms/step", "x floor", "x in-place floor", "speedup vs torch fused",
                "speedup vs best torch"]
        sections.append(f"### {model}: {n / 1e6:.1f}M parameters in {len(ps)} tensors, fp32, {device}\n\n"
                        f"Floor = bytes the step must move ÷ measured `copy_` bandwidth ({bw / 1e9:.1f} GB/s); "
                        f"in-place floor: ÷ bandwidth of an in-place `mul_` ({bw_inplace / 1e9:.1f} GB/s), "
                        "which, unlike a copy, pays no read-for-ownership of its destination.\n\n"
                        + harness.table(rows, cols))
        del ps
    body = "\n\n".join(sections)
    print("\n" + body)
    if record:
        harness.append_results(f"bench_optim ({device}{', quick' if quick else ''})", body)
    print("\nsummary (nnopt providers): model, optimizer, provider, x floor, x in-place floor, vs torch fused, "
          "vs best torch")
    for m, label, k, xf, xi, vf, vb in summary:
        print(f"  {m:5s} {label:13s} {k:12s} {xf:5.2f}x floor {xi:5.2f}x in-place  "
              f"{'' if vf is None else f'{vf:4.2f}x vs fused'}  {vb:4.2f}x vs best torch")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="many,large,tiny,llama,gpt2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (1: no thread-pool wake-ups, which a busy machine makes costly)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.device, tuple(a.models.split(",")), a.quick, not a.no_record, a.repeats)


if __name__ == "__main__":
    main()
