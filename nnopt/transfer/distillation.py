"""Knowledge distillation: ``DistillationLoss``, a fused loss of a student's logits against a teacher's, and
``distill``, a small training loop around it.

``DistillationLoss(temperature=1.0, alpha=0.5, kind="kl", beta=0.5, scale_by_t2=True, ignore_index=-100,
reduction="batchmean", backend=None, vocab="error")(student_logits [..., V], teacher_logits [..., V], target [...]
or None)``:
with T = temperature, p_s = softmax(student / T), p_t = softmax(teacher / T) over the last dimension,

    loss_row = alpha * (T² if scale_by_t2 else 1) * soft + (1 - alpha) * cross_entropy(student, target)

    kind="kl"          soft = KL(p_t || p_s)   (Hinton et al.; the usual choice)
    kind="reverse_kl"  soft = KL(p_s || p_t)   (mode seeking)
    kind="jsd"         soft = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s: the
                       generalised Jensen-Shannon divergence of TRL's GKD trainer and Liger-Kernel (beta = 0.5 is
                       the symmetric JSD). As in both, beta = 0 means KL(p_t || p_s) and beta = 1 means
                       KL(p_s || p_t), where the mixture form would vanish.

Logits may come as tensors or as any model output with a tensor ``.logits`` (``transformers``' ModelOutput:
``CausalLMOutput``, ``MaskedLMOutput``, ...). Teacher and student must share the class dimension: a vocabulary
mismatch is a ValueError naming both sizes, unless ``vocab="shared"``, which compares the first
min(V_student, V_teacher) classes of both (tokenizers that extend a common vocabulary at its end); targets must
then lie in the shared part.

The cross entropy is taken at temperature 1 against the hard labels. Rows whose target is ``ignore_index`` leave
both terms and the denominator. Reductions: "batchmean" (default) and "mean" both divide the sum over rows by the
number of counted rows (non-ignored; every row without a target) — "mean" is cross_entropy's row mean, not
kl_div's mean over B·V elements; "sum"; "none" gives the per-row losses [...] (0 at ignored rows). When no row
counts, the loss is 0 and so is the gradient. ``target`` may be None only when alpha == 1.

How it runs: the forward pass computes the loss and its gradient w.r.t. the student logits together (backends of
the ``distill_loss`` family: the C++ CPU kernel, the Triton GPU kernel, or the plain-torch reference; ``backend``
forces one, default ``auto``): no [rows, V] float32 intermediate is kept besides that gradient, which backward
scales by grad_output in place and hands to autograd. So one forward allows one backward (``retain_graph``
cannot reuse it), and double backward is not supported. Teacher logits are constants: even when they require
grad, they get none (detach the teacher, or run it under no_grad). Teacher logits of another dtype are cast to
the student's (one copy). The number of counted rows stays on the device (no host synchronisation). float64
logits run on the reference under ``auto`` (the kernels compute in float32).
"""

import math
import time

import torch

from nnopt import backends
from nnopt.reference import distill_loss as ref

FAMILY = "distill_loss"
VOCAB_MODES = ("error", "shared")


def logits_of(x):
    """``x`` itself when it is a tensor, else its tensor ``.logits`` (a transformers ModelOutput); other values are
    returned as they are (the checks name their type)."""
    if isinstance(x, torch.Tensor):
        return x
    logits = getattr(x, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else x


class _DistillLossFn(torch.autograd.Function):
    """The loss; its gradient w.r.t. the student was computed in forward and is only scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, target, impl, kwargs):
        loss, grad = impl.distill_loss_fwd(student, teacher, target, need_grad=True, **kwargs)
        ctx.grad = grad
        ctx.per_row = kwargs["reduction"] == "none"
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None  # dropping ctx's reference lets autograd take the buffer as .grad, uncopied
        if grad is None:
            raise RuntimeError("DistillationLoss: backward ran twice through one loss; the fused gradient is "
                               "consumed by the first backward (retain_graph cannot reuse it): recompute the loss")
        if ctx.per_row:
            grad.mul_(grad_output.to(grad.dtype).unsqueeze(1))
        elif not (grad_output.device.type == "cpu" and bool(grad_output == 1)):
            # on CPU, reading grad_output is no device synchronisation, and the usual 1 saves a pass over [B, V]
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None


def _check(student, teacher, target, temperature, alpha, kind, beta, ignore_index, reduction, vocab="error"):
    where = "DistillationLoss"
    if vocab not in VOCAB_MODES:
        raise ValueError(f"{where}: vocab must be one of {VOCAB_MODES}, got {vocab!r}")
    for name, value in (("temperature", temperature), ("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}: alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: beta must be in [0, 1], got {beta}")
    if kind not in ref.KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(ref.KINDS)}")
    if reduction not in ref.REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction {reduction!r}; choose one of {', '.join(ref.REDUCTIONS)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{where}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if student is None:
        return
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor or a model output with a tensor .logits, got "
                            f"{type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {x.dtype}")
    if student.dim() == 0:
        raise ValueError(f"{where}: student_logits must be [..., V] (classes last), got a 0-dim tensor")
    if teacher.dim() == student.dim() and teacher.shape[:-1] == student.shape[:-1] and teacher.shape[-1] != \
            student.shape[-1] and vocab == "error":
        raise ValueError(f"{where}: vocabulary mismatch: student_logits has {student.shape[-1]} classes, "
                         f"teacher_logits {teacher.shape[-1]}; they must match, or pass vocab='shared' to compare the "
                         f"first {min(student.shape[-1], teacher.shape[-1])}")
    if teacher.shape[:-1] != student.shape[:-1] or (teacher.shape != student.shape and vocab == "error"):
        raise ValueError(f"{where}: teacher_logits has shape {tuple(teacher.shape)}, student_logits has shape "
                         f"{tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{where}: teacher_logits is on {teacher.device}, student_logits on {student.device}")
    if target is None:
        if alpha < 1.0:
            raise ValueError(f"{where}: target is required when alpha < 1 (alpha={alpha} weighs the cross-entropy "
                             "term); pass alpha=1.0 for a teacher-only loss")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{where}: target must be a tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{where}: target must hold integer class indices, got {target.dtype}")
    if target.shape != student.shape[:-1]:
        raise ValueError(f"{where}: target has shape {tuple(target.shape)}, expected {tuple(student.shape[:-1])} "
                         "(student_logits' shape without its class dimension)")
    if target.device != student.device:
        raise ValueError(f"{where}: target is on {target.device}, student_logits on {student.device}")


def _backend(backend, logits):
    name = backends.requested(backend)
    if name == "auto" and logits.dtype == torch.float64:
        return "torch"  # the kernels compute in float32; float64 keeps its precision on the reference
    return backends.resolve(FAMILY, name, logits.device)


def _shared(student, teacher, target, ignore_index):
    """Both logits cut to their first min(V_s, V_t) classes; ValueError for a target outside them."""
    v = min(student.shape[-1], teacher.shape[-1])
    if target is not None and v < student.shape[-1]:
        outside = (target >= v) & (target != ignore_index)
        if bool(outside.any()):
            raise ValueError(f"DistillationLoss: vocab='shared' keeps classes 0..{v - 1}, but target holds class "
                             f"{int(target[outside].max())}")
    return student[..., :v], teacher[..., :v]


def distillation_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5, kind="kl",
                      beta=0.5, scale_by_t2=True, ignore_index=-100, reduction="batchmean", backend=None,
                      vocab="error"):
    """The distillation loss of the module docstring, as a function (``DistillationLoss`` calls it)."""
    student_logits, teacher_logits = logits_of(student_logits), logits_of(teacher_logits)
    _check(student_logits, teacher_logits, target, temperature, alpha, kind, beta, ignore_index, reduction, vocab)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        student_logits, teacher_logits = _shared(student_logits, teacher_logits, target, ignore_index)
    lead, n_classes = student_logits.shape[:-1], student_logits.shape[-1]
    s = student_logits.reshape(-1, n_classes).contiguous()
    t = teacher_logits.detach().reshape(-1, n_classes).to(s.dtype).contiguous()
    y = None if target is None else target.reshape(-1).to(torch.int64).contiguous()
    impl = backends.implementation(FAMILY, _backend(backend, s))
    kwargs = dict(temperature=float(temperature), alpha=float(alpha), kind=kind, beta=float(beta),
                  scale=float(temperature) ** 2 if scale_by_t2 else 1.0, ignore_index=int(ignore_index),
                  reduction=reduction)
    if torch.is_grad_enabled() and s.requires_grad:
        loss = _DistillLossFn.apply(s, t, y, impl, kwargs)
    else:
        loss, _ = impl.distill_loss_fwd(s, t, y, need_grad=False, **kwargs)
    return loss.reshape(lead) if reduction == "none" else loss


class DistillationLoss(torch.nn.Module):
    """Fused distillation loss (see the module docstring): ``loss(student_logits, teacher_logits, target=None)``.

    Student and teacher logits [..., V] (classes last), target [...] integer class indices or None. Returns a
    0-dim loss, or per-row losses [...] for ``reduction="none"``, in the student's dtype.
    """

    def __init__(self, temperature=1.0, alpha=0.5, kind="kl", beta=0.5, scale_by_t2=True, ignore_index=-100,
                 reduction="batchmean", backend=None, vocab="error"):
        super().__init__()
        _check(None, None, None, temperature, alpha, kind, beta, ignore_index, reduction, vocab)
        if backend is not None:
            backends.requested(backend)  # an unknown name fails here, not at the first call
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kind = kind
        self.beta = float(beta)
        self.scale_by_t2 = bool(scale_by_t2)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.backend = backend
        self.vocab = vocab

    def forward(self, student_logits, teacher_logits, target=None):
        return distillation_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                                 alpha=self.alpha, kind=self.kind, beta=self.beta, scale_by_t2=self.scale_by_t2,
                                 ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                                 vocab=self.vocab)

    def extra_repr(self):
        return (f"temperature={self.temperature}, alpha={self.alpha}, kind={self.kind!r}, beta={self.beta}, "
                f"scale_by_t2={self.scale_by_t2}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"vocab={self.vocab!r}")


def _split(batch):
    """(inputs, targets or None) of a batch: a tensor, or a (inputs, targets, ...) tuple/list."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _to(x, device):
    if device is not None and isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if device is not None and isinstance(x, torch.Tensor) else x


def _call(model, x):
    """``model(**x)`` for a dict of inputs (transformers style), else ``model(x)``."""
    return model(**x) if isinstance(x, dict) else model(x)


def _rows(x):
    if isinstance(x, dict):
        x = next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
        if x is None:
            raise ValueError("distill: a dict batch must hold at least one tensor")
    return len(x)


@torch.no_grad()
def _accuracy(model, data, device):
    """Top-1 accuracy of ``model`` on the labelled batches of ``data``, counted on the device."""
    was_training = model.training
    model.eval()
    correct, total = None, 0
    for batch in data:
        x, y = _split(batch)
        if y is None:
            raise ValueError("distill: eval_data batches must be (inputs, targets) pairs")
        x, y = _to(x, device), _to(y, device)
        hits = (logits_of(_call(model, x)).argmax(-1) == y).sum()
        correct = hits if correct is None else correct + hits
        total += y.numel()
    model.train(was_training)
    return float(correct) / total if total else float("nan")


def _progress(iterable, total, enabled):
    """tqdm's bar over ``iterable`` when enabled and tqdm is installed; else the iterable and None."""
    if not enabled:
        return iterable, None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable, None
    bar = tqdm(iterable, total=total, desc="distill", unit="epoch")
    return bar, bar


def distill(student, teacher, data, optimizer, epochs, *, loss=None, device=None, progress=True, eval_data=None):
    """Trains ``student`` to match ``teacher`` for ``epochs`` passes over ``data``; returns per-epoch metrics.

    ``data`` and ``eval_data``: re-iterable batches (a DataLoader, a list), each ``(inputs, targets)`` or just
    ``inputs`` (then ``loss`` must not need targets, e.g. ``DistillationLoss(alpha=1.0)``). ``inputs``: a tensor
    (``model(inputs)``) or a dict of keyword arguments (``model(**inputs)``, transformers style). Models may return
    tensors or outputs with ``.logits`` (transformers); for a causal LM pass targets already shifted (the token
    after each position), since the loss compares position by position. ``loss``: a callable
    ``(student_logits, teacher_logits, targets) -> scalar``, default ``DistillationLoss()`` (T = 1, alpha = 0.5,
    KL). ``device``: where the models and batches go (default: left where they are). The teacher runs in eval mode
    under no_grad; the student trains (its mode is restored at the end). ``progress``: a tqdm bar when tqdm is
    installed, else one printed line per epoch.

    Returns a list of one dict per epoch: ``epoch`` (1-based), ``loss`` (mean training loss per sample),
    ``seconds``, and ``accuracy`` (top-1 on ``eval_data``) when ``eval_data`` is given.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"distill: epochs must be an int >= 0, got {epochs!r}")
    loss_fn = DistillationLoss() if loss is None else loss
    if not callable(loss_fn):
        raise TypeError(f"distill: loss must be callable, got {type(loss_fn).__name__}")
    if device is not None:
        student.to(device)
        teacher.to(device)
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    history = []
    epoch_iter, bar = _progress(range(1, epochs + 1), epochs, progress)
    try:
        for epoch in epoch_iter:
            student.train()
            start = time.perf_counter()
            total, count = None, 0
            for batch in data:
                x, y = _split(batch)
                x, y = _to(x, device), _to(y, device)
                with torch.no_grad():
                    t_logits = logits_of(_call(teacher, x))
                value = loss_fn(logits_of(_call(student, x)), t_logits, y)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                n = _rows(x)
                step = value.detach() * n  # summed on the device: no synchronisation per step
                total = step if total is None else total + step
                count += n
            record = {"epoch": epoch, "loss": float(total) / count if count else float("nan"),
                      "seconds": time.perf_counter() - start}
            if eval_data is not None:
                record["accuracy"] = _accuracy(student, eval_data, device)
            history.append(record)
            line = f"loss {record['loss']:.4f}" + (f" accuracy {record['accuracy']:.4f}" if "accuracy" in record
                                                   else "")
            if bar is not None:
                bar.set_postfix_str(line)
            elif progress:
                print(f"distill: epoch {epoch}/{epochs} {line} ({record['seconds']:.1f}s)", flush=True)
    finally:
        if bar is not None:
            bar.close()
        teacher.train(teacher_was_training)
        student.train(student_was_training)
    return history
