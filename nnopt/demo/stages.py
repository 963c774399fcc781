"""The five stages of ``nnopt demo``; each returns plain data (numbers, lists) for the summary and the report.

1. optimizers: a dense MLP teacher trained with fused nnopt optimizers beside their torch.optim twins.
2. transfer: the teacher's parameters copied into a new model (report), widened and narrowed.
3. prune: iterative magnitude pruning with fine-tuning to 90% and 95% vs one-shot, then structured + compaction.
4. distill: the dense teacher distilled into the 95%-sparse student with the fused loss, vs plain fine-tuning.
5. speed: inference of a block-pruned model: dense, MaskedLinear, compacted, torch.nn.utils.prune's hooked model.
"""

import copy
import statistics
import time

import torch

import nnopt.optim as nno
import nnopt.prune as prune
from nnopt import nn as nnn
from nnopt.demo.progress import Progress
from nnopt.transfer import DistillationLoss, narrow, transfer_parameters, widen

HIDDEN = 256


def make_mlp(n_in, n_classes, hidden=HIDDEN, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)).to(device)


@torch.no_grad()
def accuracy(model, data):
    x, y = data[2], data[3]
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train(model, opt, data, steps, label, cfg, loss_fn=None, teacher=None, batch=64, seed=1):
    """``steps`` minibatch steps; returns (loss curve every ~steps/20 steps, median optimizer.step() ms)."""
    x, y = data[0], data[1]
    gen = torch.Generator().manual_seed(seed)
    curve, times, every = [], [], max(1, steps // 20)
    with Progress(label, steps, cfg["progress"]) as bar:
        for i in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen).to(x.device)
            opt.zero_grad(set_to_none=True)
            out = model(x[idx])
            if loss_fn is None:
                loss = torch.nn.functional.cross_entropy(out, y[idx])
            else:
                with torch.no_grad():
                    t_out = teacher(x[idx])
                loss = loss_fn(out, t_out, y[idx])
            loss.backward()
            _sync(cfg["device"])
            t0 = time.perf_counter()
            opt.step()
            _sync(cfg["device"])
            times.append(time.perf_counter() - t0)
            if i % every == 0 or i == steps - 1:
                curve.append((i, float(loss.detach())))
            bar.update(1, loss=curve[-1][1])
    return curve, 1e3 * statistics.median(times)


OPTIMIZERS = [
    ("SGD", "SGD", dict(lr=0.1)),
    ("SGD+momentum", "SGD", dict(lr=0.05, momentum=0.9)),
    ("Adam", "Adam", dict(lr=1e-3)),
    ("RMSprop", "RMSprop", dict(lr=1e-3)),
    ("Adagrad", "Adagrad", dict(lr=0.05)),
]


def optimizers(data, cfg):
    """Stage 1. Returns (rows, teacher): per optimizer and implementation, accuracy, loss curve and step time."""
    n_in, n_cls = data[0].shape[1], int(max(data[1].max(), data[3].max())) + 1
    chosen = OPTIMIZERS[:3] if cfg["quick"] else OPTIMIZERS
    rows, teacher = [], None
    for label, name, kwargs in chosen:
        for impl in ("nnopt", "torch"):
            model = make_mlp(n_in, n_cls, device=cfg["device"])
            if impl == "nnopt":
                opt = getattr(nno, name)(model.parameters(), backend=cfg["backend"], **kwargs)
            else:
                opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
            curve, ms = train(model, opt, data, cfg["steps"], f"{label} [{impl}]", cfg)
            rows.append(dict(optimizer=label, impl=impl, accuracy=accuracy(model, data), curve=curve, step_ms=ms))
            if impl == "nnopt" and name == "Adam":
                teacher = model
    return rows, teacher


def transfer(teacher, data, cfg):
    """Stage 2: copy the teacher into a fresh model (with the report), widen its first hidden layer, narrow it."""
    n_in, n_cls = data[0].shape[1], teacher[-1].out_features
    student = make_mlp(n_in, n_cls, seed=7, device=cfg["device"])
    report = transfer_parameters(teacher, student)
    out = dict(report=str(report), copied=report.counts.get("copied", 0), accuracy=accuracy(student, data))
    w = widen(student, "0", HIDDEN + HIDDEN // 4)
    out.update(widened_to=HIDDEN + HIDDEN // 4, widen_deviation=w.max_abs_deviation,
               accuracy_widened=accuracy(student, data))
    n = narrow(student, "0", HIDDEN // 2)
    out.update(narrowed_to=HIDDEN // 2, narrow_deviation=n.max_abs_deviation, accuracy_narrowed=accuracy(student, data))
    return out


def _weights(model):
    return [(m, "weight") for m in model if isinstance(m, torch.nn.Linear)]


def sparsity(model):
    """Fraction of Linear weight entries that are exactly 0."""
    ws = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _finetune(model, data, steps, cfg, label):
    opt = nno.Adam(model.parameters(), lr=1e-3, backend=cfg["backend"])
    train(model, opt, data, steps, label, cfg)


def pruning(teacher, data, cfg):
    """Stage 3. Returns (curve rows, structured result, the 95%-sparse model)."""
    ft = max(10, cfg["steps"] // 2)
    rows = [dict(method="dense", sparsity=0.0, accuracy=accuracy(teacher, data))]
    model = copy.deepcopy(teacher)
    sparse95 = None
    for target, rounds in ((0.9, 3), (0.95, 1)):
        # prune.iterative: each round prunes globally by magnitude, then fine-tunes (masks hold the zeros).
        prune.iterative(model, lambda m: _finetune(m, data, ft, cfg, f"iterative → {target:.0%}"),
                        lambda m: accuracy(m, data), target=target, rounds=rounds, max_drop=1.0)
        rows.append(dict(method="iterative + fine-tune", sparsity=sparsity(model), accuracy=accuracy(model, data)))
        if target == 0.95:
            sparse95 = model
    for target in (0.9, 0.95):
        one = copy.deepcopy(teacher)
        prune.global_unstructured(_weights(one), prune.L1Unstructured, amount=target)
        rows.append(dict(method="one-shot (no fine-tuning)", sparsity=sparsity(one), accuracy=accuracy(one, data)))
        _finetune(one, data, ft, cfg, f"one-shot {target:.0%} + fine-tune")
        rows.append(dict(method="one-shot + fine-tune", sparsity=sparsity(one), accuracy=accuracy(one, data)))
    structured = copy.deepcopy(teacher)
    for m in list(structured)[:-1]:
        if isinstance(m, torch.nn.Linear):
            prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    _finetune(structured, data, ft, cfg, "structured 50% + fine-tune")
    acc_structured = accuracy(structured, data)
    rep = prune.compact(structured)
    result = dict(neurons_pruned=0.5, accuracy=acc_structured, accuracy_compacted=accuracy(structured, data),
                  params_before=rep.params_before, params_after=rep.params_after)
    return rows, result, sparse95


def distill(teacher, student, data, cfg):
    """Stage 4: the 95%-sparse student fine-tuned with the fused distillation loss vs with labels only."""
    steps = cfg["steps"]
    plain = copy.deepcopy(student)
    _finetune(plain, data, steps, cfg, "95% student, labels only")
    teacher.eval()
    loss = DistillationLoss(temperature=2.0, alpha=0.5)
    opt = nno.Adam(student.parameters(), lr=1e-3, backend=cfg["backend"])
    curve, _ = train(student, opt, data, steps, "95% student, distilled", cfg, loss_fn=loss, teacher=teacher)
    teacher.train()
    return dict(teacher=accuracy(teacher, data), labels_only=accuracy(plain, data), distilled=accuracy(student, data),
                student_nonzeros=sum(int((m.weight != 0).sum()) for m in student if isinstance(m, torch.nn.Linear)),
                teacher_params=sum(m.weight.numel() for m in teacher if isinstance(m, torch.nn.Linear)))


def _time(fn, x, repeats, device):
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def speed(cfg):
    """Stage 5: inference of a 90%-block-pruned MLP (32×32 blocks) and of a 75%-neuron-pruned one, side by side."""
    width, batch, repeats = (1024, 128, 5) if cfg["quick"] else (4096, 256, 7)
    device = cfg["device"]
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 10)).to(device).eval()
    x = torch.randn(batch, width, device=device)
    blocked = copy.deepcopy(dense)
    for m in list(blocked)[:-1]:
        if isinstance(m, torch.nn.Linear):
            prune.block_unstructured(m, "weight", amount=0.9, block=(32, 32))
    masked = nnn.convert(copy.deepcopy(blocked))
    hooked = copy.deepcopy(dense)
    for m_hooked, m_blocked in zip(hooked, blocked):
        if isinstance(m_hooked, torch.nn.Linear) and hasattr(m_blocked, "weight_mask"):
            torch.nn.utils.prune.custom_from_mask(m_hooked, "weight", m_blocked.weight_mask)
    compacted = copy.deepcopy(dense)
    for m in list(compacted)[:-1]:
        if isinstance(m, torch.nn.Linear):
            prune.ln_structured(m, "weight", amount=0.75, n=2, dim=0)
    prune.compact(compacted)
    providers = [("dense (torch F.linear)", dense), ("90% blocks, torch.nn.utils.prune hooks", hooked),
                 ("90% blocks, dense weights with zeros", blocked), ("90% blocks, nnopt MaskedLinear", masked),
                 ("75% neurons, nnopt prune.compact", compacted)]
    ms = {name: [] for name, _ in providers}
    for _ in range(3):  # interleaved rounds: a noisy machine slows every provider alike
        for name, model in providers:
            ms[name].append(_time(model, x, repeats, device))
    base = statistics.median(ms[providers[0][0]])
    rows = [dict(model=name, ms=statistics.median(v), speedup=base / statistics.median(v)) for name, v in ms.items()]
    return dict(width=width, batch=batch, rows=rows)
