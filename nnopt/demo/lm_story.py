"""The stages of ``nnopt demo lm``: a byte-level causal LM trained, grown, pruned one-shot, recovered and served.

Each stage returns plain data (numbers, lists, strings) for the summary table and the report folder.

1. train: the dense model with nnopt's fused AdamW beside torch.optim.AdamW (same seed, same batches) and with
   8-bit states: loss curves, step time, optimizer state bytes, held-out perplexity.
2. grow: the trained model grown function-preservingly (one more block, a wider MLP), trained on, beside a model
   of the grown size trained from scratch.
3. prune: one-shot magnitude, Wanda and SparseGPT at 50% unstructured, 2:4 and 90% 32×32 blocks: perplexity.
4. recover: the 90%-block model fine-tuned, and distilled from the dense teacher with the fused loss.
5. serve: MaskedLinear conversion; decode tokens/s (B=1, B=8) and prefill tokens/s against dense, fp32 and bf16;
   a few sampled lines from the dense and the sparse model.
"""

import copy
import statistics
import time

import torch

import nnopt.optim as nno
import nnopt.prune as prune
from nnopt import layers
from nnopt import nn as nnn
from nnopt.demo import lm
from nnopt.demo.progress import Progress
from nnopt.transfer import DistillationLoss, insert_block, widen_mlp

IGNORE = -100


def sizes(quick, device):
    """Model and run sizes: small on a CPU (the LM story in ~2.5 minutes on 2 idle cores, ~30 s quick), larger on
    a GPU (d_model 512, 4 layers, 600 steps at batch 32)."""
    if device == "cuda":
        model = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=2048, seq_len=256)
        run = dict(steps=600, batch=32, grow_steps=200, recover_steps=150, calib=128, eval_windows=128, gen=64)
    elif quick:
        model = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, seq_len=64)
        run = dict(steps=250, batch=16, grow_steps=40, recover_steps=30, calib=16, eval_windows=32, gen=16)
    else:
        model = dict(d_model=192, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=768, seq_len=128)
        run = dict(steps=300, batch=16, grow_steps=80, recover_steps=60, calib=64, eval_windows=64, gen=32)
    if quick and device == "cuda":
        run.update(steps=200, grow_steps=60, recover_steps=60)
    return model, run


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def linears(model):
    """The transformer blocks' linear layers ``[(name, module)]`` (lm_head and embeddings excluded)."""
    return [(n, m) for n, m in layers.linear_modules(model) if not n.endswith("lm_head")]


def sparsity(model):
    """Fraction of the blocks' linear weights that are exactly 0."""
    ws = [m.weight for _, m in linears(model)]
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def state_bytes(opt):
    """Bytes of every tensor in the optimizer's state (step counts excluded), per parameter."""
    total = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                if isinstance(v, torch.Tensor) and k != "step")
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return total / n


def _train(model, opt, corpus, steps, label, cfg, seed=1, loss_fn=None):
    """``steps`` steps on seeded training windows; (loss curve [(step, loss)], median step ms)."""
    run, device = cfg["run"], cfg["device"]
    gen = torch.Generator().manual_seed(seed)
    every, curve, times = max(1, steps // 30), [], []
    model.train()
    with Progress(label, steps, cfg["progress"]) as bar:
        for i in range(steps):
            ids = corpus.batch("train", run["batch"], cfg["model"]["seq_len"], gen).to(device)
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss if loss_fn is None else loss_fn(model, ids)
            loss.backward()
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if i % every == 0 or i == steps - 1:
                curve.append((i, float(loss.detach())))
            bar.update(1, loss=curve[-1][1])
    return curve, 1e3 * statistics.median(times)


def perplexity(model, cfg):
    return lm.evaluate(model, cfg["eval"], batch_size=cfg["run"]["batch"])[1]


def train(corpus, cfg):
    """Stage 1. Returns (rows, the model trained with nnopt's AdamW)."""
    mcfg, device = cfg["model"], cfg["device"]
    rows, teacher = [], None
    runs = [("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01)),
            ("nnopt AdamW", lambda ps: nno.AdamW(ps, lr=3e-3, weight_decay=0.01, backend=cfg["backend"])),
            ("nnopt AdamW8bit", lambda ps: nno.AdamW8bit(ps, lr=3e-3, weight_decay=0.01, backend=cfg["backend"]))]
    for name, make in runs:
        model = lm.build(cfg["kind"], seed=0, **mcfg).to(device)
        opt = make(model.parameters())
        curve, ms = _train(model, opt, corpus, cfg["run"]["steps"], name, cfg)
        rows.append(dict(optimizer=name, curve=curve, step_ms=ms, state_bytes_per_param=state_bytes(opt),
                         perplexity=perplexity(model, cfg)))
        if name == "nnopt AdamW":
            teacher = model
    return rows, teacher


def grow(teacher, corpus, cfg):
    """Stage 2: the trained model with one more block (identity at insertion) and a 1.5x wider MLP (Net2Net, with a
    little noise to break the replicas' symmetry), trained on beside a model of the grown size from scratch."""
    mcfg, steps = cfg["model"], cfg["run"]["grow_steps"]
    wide, wrep = widen_mlp(teacher, mcfg["d_ff"] * 3 // 2, noise=1e-3, generator=torch.Generator().manual_seed(0))
    grown, drep = insert_block(wide, mcfg["n_layers"])
    probe = cfg["eval"][:4].to(cfg["device"])
    with torch.no_grad():
        teacher.eval(), grown.eval()
        before, after = teacher(input_ids=probe).logits, grown(input_ids=probe).logits
    deviation = float((after - before).abs().max() / before.abs().max())
    start_ppl = perplexity(grown, cfg)
    rows = []
    big = dict(mcfg, n_layers=mcfg["n_layers"] + 1, d_ff=mcfg["d_ff"] * 3 // 2)
    scratch = lm.build(cfg["kind"], seed=1, **big).to(cfg["device"])
    for name, model in ((f"grown from the trained model (+{cfg['run']['steps']} steps before)", grown),
                        ("same size, from scratch", scratch)):
        opt = nno.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, backend=cfg["backend"])
        curve, _ = _train(model, opt, corpus, steps, name.split(" (")[0], cfg, seed=3)
        rows.append(dict(model=name, params=sum(p.numel() for p in model.parameters()), curve=curve,
                         perplexity=perplexity(model, cfg)))
    return dict(rows=rows, relative_deviation=deviation, perplexity_at_growth=start_ppl, steps=steps,
                report=f"{wrep}\n{drep}", sizes=big)


def _calibration(corpus, cfg):
    """Calibration windows from the training split (seeded), as a list of model inputs."""
    gen = torch.Generator().manual_seed(123)
    ids = corpus.batch("train", cfg["run"]["calib"], cfg["model"]["seq_len"], gen).to(cfg["device"])
    return [ids[i:i + 8] for i in range(0, ids.shape[0], 8)]


def _magnitude(model, pattern, amount):
    for _, m in linears(model):
        if pattern == "unstructured":
            prune.l1_unstructured(m, "weight", amount=amount)
        elif pattern == "2:4":
            prune.nm_structured(m, "weight", n=2, m=4, dim=layers.in_dim(m))
        else:
            prune.block_unstructured(m, "weight", amount=amount, block=pattern)


PATTERNS = [("50%", "unstructured", 0.5), ("2:4", "2:4", 0.5), ("90% 32×32 blocks", (32, 32), 0.9)]


def pruning(teacher, corpus, cfg):
    """Stage 3. Returns (rows, the 90%-block model of the best method)."""
    rows = [dict(method="dense", pattern="-", sparsity=0.0, perplexity=perplexity(teacher, cfg))]
    best90 = None
    calib = _calibration(corpus, cfg)
    methods = [("magnitude", _magnitude),
               ("Wanda", lambda m, pat, amt: prune.wanda(m, calib, None if pat == "2:4" else amt, pattern=pat)),
               ("SparseGPT", lambda m, pat, amt: prune.sparsegpt(m, calib, None if pat == "2:4" else amt,
                                                                  pattern=pat))]
    total = len(methods) * len(PATTERNS)
    with Progress("one-shot pruning", total, cfg["progress"]) as bar:
        for method, fn in methods:
            for label, pattern, amount in PATTERNS:
                model = copy.deepcopy(teacher)
                fn(model, pattern, amount)
                ppl = perplexity(model, cfg)
                rows.append(dict(method=method, pattern=label, sparsity=sparsity(model), perplexity=ppl))
                if amount == 0.9 and (best90 is None or ppl < best90[0]):
                    best90 = (ppl, method, model)
                bar.update(1)
    return rows, best90


def _padded_batch(ids, gen):
    """Right-padding on a random tail of each row (labels IGNORE there), as variable-length batches have."""
    lengths = torch.randint(ids.shape[1] // 2, ids.shape[1] + 1, (ids.shape[0],), generator=gen)
    keep = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return keep.to(ids.device)


def recover(teacher, sparse, method, corpus, cfg):
    """Stage 4: the 90%-block model fine-tuned on labels, and distilled from the dense teacher (fused loss on
    [B, T, V] logits, padded positions ignored); masks hold the zeros throughout."""
    steps = cfg["run"]["recover_steps"]
    before = perplexity(sparse, cfg)
    tuned = copy.deepcopy(sparse)
    opt = nno.AdamW(tuned.parameters(), lr=1e-3, weight_decay=0.0, backend=cfg["backend"])
    ft_curve, _ = _train(tuned, opt, corpus, steps, "90% blocks: fine-tune", cfg, seed=7)
    distilled = copy.deepcopy(sparse)
    teacher.eval()
    loss = DistillationLoss(temperature=2.0, alpha=0.5, ignore_index=IGNORE)
    gen = torch.Generator().manual_seed(11)

    def distill_loss(model, ids):
        keep = _padded_batch(ids, gen)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=keep.long()).logits
        s_logits = model(input_ids=ids, attention_mask=keep.long()).logits
        target = ids[:, 1:].masked_fill(~keep[:, 1:], IGNORE)
        return loss(s_logits[:, :-1], t_logits[:, :-1], target)

    opt = nno.AdamW(distilled.parameters(), lr=1e-3, weight_decay=0.0, backend=cfg["backend"])
    kd_curve, _ = _train(distilled, opt, corpus, steps, "90% blocks: distil", cfg, seed=7, loss_fn=distill_loss)
    return dict(method=method, steps=steps, before=before, fine_tuned=perplexity(tuned, cfg),
                distilled=perplexity(distilled, cfg), sparsity_after=sparsity(distilled),
                curves=dict(fine_tune=ft_curve, distill=kd_curve)), distilled


@torch.no_grad()
def _generate(model, prompt, new, sample=False):
    kwargs = dict(do_sample=True, top_k=20, temperature=0.8) if sample else dict(do_sample=False)
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0, **kwargs)


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def serve(teacher, sparse, corpus, cfg):
    """Stage 5: decode and prefill tokens/s of the dense and the converted sparse model, fp32 and bf16."""
    device, new, seq = cfg["device"], cfg["run"]["gen"], cfg["model"]["seq_len"]
    prompt_len = min(32, seq - new)
    models = {"dense": copy.deepcopy(teacher).eval(), "sparse": nnn.convert(copy.deepcopy(sparse)).eval()}
    rows = []
    dtypes = [torch.float32, torch.bfloat16]
    with Progress("decode and prefill timing", len(dtypes) * 2 * 3, cfg["progress"]) as bar:
        for dtype in dtypes:
            cast = {k: copy.deepcopy(m).to(dtype) for k, m in models.items()}
            for batch in (1, 8):
                prompt = corpus.windows("heldout", prompt_len, batch).to(device)
                res = {}
                for _ in range(2):  # interleaved rounds: noise slows both alike
                    for name, m in cast.items():
                        full = _timed(lambda: _generate(m, prompt, new), device, 2)
                        first = _timed(lambda: _generate(m, prompt, 1), device, 2)
                        res.setdefault(name, []).append((max(full - first, 1e-9) / (new - 1), first))
                        bar.update(0)
                for name, vals in res.items():
                    per_tok = statistics.median(v[0] for v in vals)
                    rows.append(dict(model=name, dtype=str(dtype).replace("torch.", ""), batch=batch,
                                     decode_tokens_per_s=batch / per_tok))
                bar.update(3)
            prefill = corpus.windows("heldout", seq, 1).to(device)
            for name, m in cast.items():
                t = _timed(lambda: m(input_ids=prefill), device, 3)
                rows.append(dict(model=name, dtype=str(dtype).replace("torch.", ""), batch=1,
                                 prefill_tokens_per_s=seq / t))
    for name in ("dense", "sparse"):
        for dtype in ("float32", "bfloat16"):
            for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                for r in rows:
                    if r["model"] == "sparse" and r["dtype"] == dtype and key in r:
                        base = next(d for d in rows if d["model"] == "dense" and d["dtype"] == dtype
                                    and d["batch"] == r["batch"] and key in d)
                        r[key.replace("tokens_per_s", "speedup")] = r[key] / base[key]
    torch.manual_seed(0)
    start = torch.tensor([list(b"def ")], device=device)
    samples = {name: bytes(_generate(m, start, 3 * new, sample=True)[0].tolist()).decode("utf-8", "replace")
               for name, m in models.items()}
    return dict(rows=rows, samples=samples, new_tokens=new, prompt_len=prompt_len, prefill_len=seq)


def load_text(path, quick, device):
    """The corpus for the story, checked long enough for its sequences (TextError otherwise)."""
    from nnopt.demo.text import TextError, corpus

    mcfg, _ = sizes(quick, device)
    c = corpus(path, max_bytes=1_000_000 if quick else 4_000_000)
    need = mcfg["seq_len"] + 1
    for split in ("train", "heldout"):
        if c.split(split).numel() < need:
            raise TextError(f"--data {path}: the {split} part of the text ({c.split(split).numel()} bytes) is shorter "
                            f"than one training sequence ({need} bytes); give more text")
    return c


def run(quick, device, corpus, out, backend, steps, progress, kind="llama"):
    """The five stages on ``corpus``; writes the report into ``out``; returns the report's path."""
    from nnopt.demo import lm_report

    mcfg, rcfg = sizes(quick, device)
    if steps is not None:
        rcfg["steps"] = steps
    cfg = dict(device=device, quick=quick, backend=backend, progress=progress, kind=kind, model=mcfg, run=rcfg)
    cfg["eval"] = corpus.windows("heldout", mcfg["seq_len"], rcfg["eval_windows"])
    start = time.perf_counter()
    probe = lm.build(kind, **mcfg)
    params = sum(p.numel() for p in probe.parameters())
    source = f"transformers {type(probe).__name__} (config built here, random init)"
    del probe
    print(f"nnopt demo lm: {source}, {params:,} parameters; text: {corpus.source}; device {device}, "
          f"{rcfg['steps']} steps{' (quick)' if quick else ''}")
    results = dict(model=mcfg, run=rcfg, model_source=source, params=params, text=corpus.source,
                   train_bytes=corpus.train.numel(), heldout_bytes=corpus.heldout.numel(), device=device,
                   torch=torch.__version__, backend=backend)
    print("\n[1/5] train the dense model")
    results["train"], teacher = train(corpus, cfg)
    print("[2/5] grow")
    results["grow"] = grow(teacher, corpus, cfg)
    print(results["grow"]["report"])
    print("[3/5] one-shot pruning")
    results["prune"], (_, method, sparse90) = pruning(teacher, corpus, cfg)
    print("[4/5] recover the 90%-block model")
    results["recover"], recovered = recover(teacher, sparse90, method, corpus, cfg)
    print("[5/5] serve")
    results["serve"] = serve(teacher, recovered, corpus, cfg)
    results["seconds"] = time.perf_counter() - start
    print()
    for title, table in lm_report.tables(results).items():
        print(f"{title}\n{table}\n")
    path = lm_report.write(results, out)
    print(f"report: {path}")
    return path
