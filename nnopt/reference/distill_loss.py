"""Plain-PyTorch distillation loss: the test oracle, the benchmark baseline and the `torch` backend of the
distill_loss family.

``distill_loss_fwd(student, teacher, target, *, temperature, alpha, kind, beta, scale, ignore_index, reduction,
need_grad=True) -> (loss, grad)``; the same name and signature in nnopt.kernels.distill_loss (Triton) and the
registered op ``torch.ops.nnopt.distill_loss_fwd`` (csrc/cpu/distill_loss.cpp).

Shapes: student and teacher logits [B, V] (contiguous, one dtype, one device), target [B] int64 or None.
With T = temperature, p_s = softmax(student / T), p_t = softmax(teacher / T) along V, the loss of row r is

    l_r = alpha * scale * soft_r + (1 - alpha) * ce_r           (0 when target[r] == ignore_index)

    kind="kl"          soft = KL(p_t || p_s) = Σ p_t (log p_t - log p_s)
    kind="reverse_kl"  soft = KL(p_s || p_t)
    kind="jsd"         soft = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
                       (the generalised JSD of TRL's GKD trainer and Liger-Kernel; like them, beta = 0 means
                       KL(p_t || p_s) and beta = 1 means KL(p_s || p_t), where the mixture form would vanish)
    ce_r = cross_entropy(student[r], target[r]) at temperature 1 (needs target; skipped when alpha == 1)

``scale`` is the caller's factor of the soft term (T² by Hinton et al.'s convention, so its gradient keeps its
size as T changes). Rows whose target is ``ignore_index`` drop out of both terms and of the count; with no target
every row counts. Reductions: "batchmean" and "mean" = Σ l_r / max(count, 1) (both mean over counted rows, like
cross_entropy's "mean"; not kl_div's mean over B·V elements), "sum" = Σ l_r, "none" = l [B] (0 at ignored rows).
No rows counted gives a loss of 0 and a zero gradient.

Returns ``loss`` (0-dim, or [B] for "none", in the logits' dtype) and ``grad`` = d loss / d student [B, V] in the
logits' dtype (for "none": d l_r / d student[r]); with ``need_grad=False``, grad is an empty tensor. The teacher
gets no gradient. Gradient of a row (before the reduction's 1/count): with a = student / T, q = softmax(student),

    kl:          alpha * scale / T * (p_s - p_t)
    reverse_kl:  alpha * scale / T * p_s ⊙ (log p_s - log p_t - soft)
    jsd:         alpha * scale / T * p_s ⊙ (g - Σ p_s g),  g = (1 - beta) (log p_s - log m)
    ce:          (1 - alpha) * (q - onehot(target))

This module computes the losses with log_softmax, kl_div(log_target=True) and cross_entropy and the gradient with
autograd, in the logits' dtype (float64 for the tests' oracle).
"""

import math

import torch
import torch.nn.functional as F

KINDS = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "mean", "sum", "none")


def effective_kind(kind, beta):
    """The kind computed: jsd at beta 0 or 1 is the forward or reverse KL (the TRL / Liger convention)."""
    if kind == "jsd" and beta == 0.0:
        return "kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def check_args(student, teacher, target, temperature, alpha, kind, beta, reduction, where="distill_loss_fwd"):
    """The checks every backend makes on the primitive's arguments (ValueError/TypeError naming the argument)."""
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}: alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: beta must be in [0, 1], got {beta}")
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"{where}: student and teacher must be [B, V] of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if teacher.dtype != student.dtype or teacher.device != student.device:
        raise TypeError(f"{where}: teacher must match student's dtype and device ({student.dtype}, "
                        f"{student.device}), got {teacher.dtype}, {teacher.device}")
    if target is None:
        if alpha < 1.0:
            raise ValueError(f"{where}: target is required when alpha < 1 (the cross-entropy term)")
    elif target.dtype != torch.int64 or target.shape != student.shape[:1] or target.device != student.device:
        raise ValueError(f"{where}: target must be int64 [{student.shape[0]}] on {student.device}, got "
                         f"{target.dtype} {tuple(target.shape)} on {target.device}")


def _soft(ls, lt, kind, beta):
    """Per-row soft loss from the log-probabilities ls (student) and lt (teacher) [B, V]."""
    if kind == "kl":
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), 0)
    return (beta * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1))


def _loss(student, teacher, target, temperature, alpha, kind, beta, scale, ignore_index, reduction):
    ls = F.log_softmax(student / temperature, dim=-1)
    lt = F.log_softmax(teacher / temperature, dim=-1)
    rows = (alpha * scale) * _soft(ls, lt, effective_kind(kind, beta), beta)
    count = student.shape[0]
    if target is not None:
        valid = target != ignore_index
        if alpha < 1.0:
            rows = rows + (1 - alpha) * F.cross_entropy(student, target, ignore_index=ignore_index, reduction="none")
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        count = valid.sum()  # on the device: no host synchronisation
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if isinstance(count, int):
        return rows.sum() / max(count, 1)
    return rows.sum() / count.clamp_min(1)


def distill_loss_fwd(student, teacher, target, *, temperature, alpha, kind, beta, scale, ignore_index, reduction,
                     need_grad=True):
    """(loss, d loss / d student) of the fused distillation loss; see the module docstring."""
    check_args(student, teacher, target, temperature, alpha, kind, beta, reduction)
    args = (temperature, alpha, kind, beta, scale, ignore_index, reduction)
    if not need_grad:
        with torch.no_grad():
            return _loss(student, teacher.detach(), target, *args), student.new_empty(0)
    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        loss = _loss(s, teacher.detach(), target, *args)
        (grad,) = torch.autograd.grad(loss, s, torch.ones_like(loss))
    return loss.detach(), grad
