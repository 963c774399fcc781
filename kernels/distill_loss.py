"""Fused distillation loss in Triton: the loss and its gradient w.r.t. the student logits, streaming each row.

Same name, signature and math as nnopt.reference.distill_loss (the oracle, whose docstring defines the loss):

    distill_loss_fwd(student, teacher, target, *, temperature, alpha, kind, beta, scale, ignore_index, reduction,
                     need_grad=True) -> (loss, grad)

With a = student / T, b = teacher / T, the loss of a row is alpha * scale * soft + (1 - alpha) * (lse(s) - s[y]):

    kl          soft = Σ p_t (b - a) - lse(b) + lse(a)          grad = alpha scale / T (p_s - p_t)
    reverse_kl  soft = Σ p_s (a - b) - lse(a) + lse(b)          grad = alpha scale / T p_s (log p_s - log p_t - soft)
    jsd         soft = beta Σ p_t (log p_t - log m) + (1 - beta) Σ p_s (log p_s - log m),  log m = logaddexp(
                log beta + log p_t, log(1 - beta) + log p_s);   grad = alpha scale / T p_s (g - Σ p_s g),
                g = (1 - beta)(log p_s - log m)
    ce          grad += (1 - alpha) (softmax(s) - onehot(y))

each gradient multiplied by the reduction's weight w (1 / max(count, 1) for "batchmean"/"mean", else 1).

Shapes: student, teacher [B, V] contiguous, one dtype (float32, bfloat16 or float16), one CUDA device (CPU with
TRITON_INTERPRET=1); target [B] int64 or None. Results: loss (0-dim, [B] for "none") and grad [B, V] in the logits'
dtype; float32 row losses [B] are the only other buffer.

One program per row, looping over V in BLOCK_V chunks, fp32 math, 64-bit row offsets, masked loads and stores:
  pass 1  online: the running maxima of s and t (the maximum of a = s/T is max(s)/T since T > 0), the sums
          Σ exp(a - max a), Σ exp(b - max b), Σ exp(s - max s) (cross entropy, at T = 1), and the weighted sum
          Σ exp(b - max b)(b - a) (kl) or Σ exp(a - max a)(a - b) (reverse_kl), each rescaled when a maximum
          grows; this gives every log-sum-exp and, for kl and reverse_kl, the soft loss.
  pass 2  (jsd only) Σ p_t (log p_t - log m) and Σ p_s (log p_s - log m): the soft loss and Σ p_s g.
  last    the gradient of the row, scaled by w (read from a one-element device tensor: the count of counted rows
          is never read on the host), rounded once to the logits' dtype.
The logits are re-read by the later passes (from L2 when the row fits); no [B, V] intermediate exists besides the
gradient. A row whose target is ignore_index writes loss 0 and a zero gradient row. A target outside [0, V) that
is not ignore_index makes the row's loss NaN (a kernel cannot raise without a host synchronisation).
"""

import math

import torch
import triton
import triton.language as tl

from ._utils import cast, tl_dtype

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KINDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}
_REDUCTIONS = ("batchmean", "mean", "sum", "none")
# Classes per chunk (tests lower it to exercise many chunks per row under the interpreter). With 16 warps a
# 4096-class chunk is 8 elements per thread per tensor; compiled for sm_90 the kernel takes 51 (kl) to 76 (jsd)
# registers with no spills. A starting point sized from that, not yet timed on the card (bench/bench_distill.py).
MAX_BLOCK_V = 4096


@triton.jit
def _distill_kernel(s_ptr, t_ptr, y_ptr, w_ptr, loss_ptr, g_ptr, V, inv_t, alpha, beta, scale, log_beta,
                    log_1m_beta, ignore_index, KIND: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr,
                    NEED_GRAD: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = g_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    y = tl.zeros((), tl.int64)
    keep = row >= 0  # a runtime `true`: one code path with and without targets
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        keep = y != ignore_index
    if keep:
        neg_inf = float("-inf")
        m_s = tl.full((), neg_inf, tl.float32)
        m_t = tl.full((), neg_inf, tl.float32)
        z_a = tl.zeros((), tl.float32)
        z_b = tl.zeros((), tl.float32)
        z_c = tl.zeros((), tl.float32)
        acc = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32)
            ms_new = tl.maximum(m_s, tl.max(s, 0))
            mt_new = tl.maximum(m_t, tl.max(t, 0))
            # shift by 0 while every logit so far is -inf: exp(-inf - shift) stays 0 instead of NaN
            c_s = tl.where(ms_new == neg_inf, 0.0, ms_new)
            c_t = tl.where(mt_new == neg_inf, 0.0, mt_new)
            # rescale by the old maximum (not its shift): exp(-inf) = 0 multiplies the zero sums of before
            r_a = tl.exp((m_s - c_s) * inv_t)
            r_b = tl.exp((m_t - c_t) * inv_t)
            a = s * inv_t
            b = t * inv_t
            e_a = tl.exp(a - c_s * inv_t)
            e_b = tl.exp(b - c_t * inv_t)
            z_a = z_a * r_a + tl.sum(e_a, 0)
            z_b = z_b * r_b + tl.sum(e_b, 0)
            # e_a = e_b = 0 on masked lanes; zeroing a and b there avoids -inf - -inf
            if KIND == 0:
                acc = acc * r_b + tl.sum(e_b * (tl.where(mask, b, 0.0) - tl.where(mask, a, 0.0)), 0)
            if KIND == 1:
                acc = acc * r_a + tl.sum(e_a * (tl.where(mask, a, 0.0) - tl.where(mask, b, 0.0)), 0)
            if HAS_CE:
                z_c = z_c * tl.exp(m_s - c_s) + tl.sum(tl.exp(s - c_s), 0)
            m_s = ms_new
            m_t = mt_new
        lse_a = m_s * inv_t + tl.log(z_a)
        lse_b = m_t * inv_t + tl.log(z_b)
        soft = tl.zeros((), tl.float32)
        g_mean = tl.zeros((), tl.float32)
        if KIND == 0:
            soft = acc / z_b - lse_b + lse_a
        if KIND == 1:
            soft = acc / z_a - lse_a + lse_b
        if KIND == 2:
            k_t = tl.zeros((), tl.float32)
            k_s = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                lp_s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_a
                lp_t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_b
                lm = _log_mixture(lp_s, lp_t, log_beta, log_1m_beta)
                k_t += tl.sum(tl.where(mask, tl.exp(lp_t) * (lp_t - lm), 0.0), 0)
                k_s += tl.sum(tl.where(mask, tl.exp(lp_s) * (lp_s - lm), 0.0), 0)
            soft = beta * k_t + (1.0 - beta) * k_s
            g_mean = (1.0 - beta) * k_s
        loss = alpha * scale * soft
        lse_c = tl.zeros((), tl.float32)
        if HAS_CE:
            lse_c = m_s + tl.log(z_c)
            in_range = (y >= 0) & (y < V)
            s_y = tl.load(s_row + y, mask=in_range, other=float("nan")).to(tl.float32)
            loss += (1.0 - alpha) * (lse_c - s_y)
        tl.store(loss_ptr + row, loss)
        if NEED_GRAD:
            w = tl.load(w_ptr)
            c_soft = w * alpha * scale * inv_t
            c_ce = w * (1.0 - alpha)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                lp_s = s * inv_t - lse_a
                lp_t = t * inv_t - lse_b
                p_s = tl.exp(lp_s)
                if KIND == 0:
                    g = c_soft * (p_s - tl.exp(lp_t))
                if KIND == 1:
                    g = c_soft * p_s * (lp_s - lp_t - soft)
                if KIND == 2:
                    lm = _log_mixture(lp_s, lp_t, log_beta, log_1m_beta)
                    g = c_soft * p_s * ((1.0 - beta) * (lp_s - lm) - g_mean)
                if HAS_CE:
                    g += c_ce * (tl.exp(s - lse_c) - tl.where(cols == y, 1.0, 0.0))
                tl.store(g_row + cols, cast(g, G_DTYPE), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if NEED_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros((BLOCK_V,), G_DTYPE), mask=cols < V)


@triton.jit
def _log_mixture(lp_s, lp_t, log_beta, log_1m_beta):
    """log(beta p_t + (1 - beta) p_s) as a logaddexp: finite where both probabilities underflow."""
    x1 = lp_t + log_beta
    x2 = lp_s + log_1m_beta
    hi = tl.maximum(x1, x2)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x1, x2) - hi))


def _check(student, teacher, target, temperature, alpha, kind, beta, reduction):
    where = "distill_loss_fwd"
    if kind not in _KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(_KINDS)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction {reduction!r}; choose one of {', '.join(_REDUCTIONS)}")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}: alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: beta must be in [0, 1], got {beta}")
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"{where}: student and teacher must be [B, V] of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.dtype not in _DTYPES:
        raise TypeError(f"{where}: the Triton kernel takes float32, bfloat16 or float16 logits, got {student.dtype}")
    if teacher.dtype != student.dtype or teacher.device != student.device:
        raise TypeError(f"{where}: teacher must match student's dtype and device ({student.dtype}, "
                        f"{student.device}), got {teacher.dtype}, {teacher.device}")
    if not (student.is_contiguous() and teacher.is_contiguous()):
        raise ValueError(f"{where}: student and teacher must be contiguous")
    if target is None:
        if alpha < 1.0:
            raise ValueError(f"{where}: target is required when alpha < 1 (the cross-entropy term)")
    elif target.dtype != torch.int64 or target.shape != student.shape[:1] or target.device != student.device:
        raise ValueError(f"{where}: target must be int64 [{student.shape[0]}] on {student.device}, got "
                         f"{target.dtype} {tuple(target.shape)} on {target.device}")


def distill_loss_fwd(student, teacher, target, *, temperature, alpha, kind, beta, scale, ignore_index, reduction,
                     need_grad=True):
    """(loss, d loss / d student); see the module docstring and nnopt.reference.distill_loss."""
    _check(student, teacher, target, temperature, alpha, kind, beta, reduction)
    if kind == "jsd" and beta in (0.0, 1.0):  # the TRL / Liger convention for the endpoints
        kind = "kl" if beta == 0.0 else "reverse_kl"
    n_rows, n_cols = student.shape
    device = student.device
    rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    # the gradient's weight: 1 / max(count, 1) for the means, else 1; the count stays on the device
    count = n_rows if target is None else (target != ignore_index).sum()
    if reduction in ("sum", "none"):
        weight = torch.ones(1, dtype=torch.float32, device=device)
    elif target is None:
        weight = torch.full((1,), 1.0 / max(n_rows, 1), dtype=torch.float32, device=device)
    else:
        weight = (1.0 / count.clamp_min(1).to(torch.float32)).reshape(1)
    if n_rows and n_cols:
        block = min(MAX_BLOCK_V, triton.next_power_of_2(n_cols))
        beta_f = float(beta)
        log_beta = math.log(beta_f) if beta_f > 0 else 0.0
        log_1m_beta = math.log1p(-beta_f) if beta_f < 1 else 0.0
        _distill_kernel[(n_rows,)](
            student, teacher, target if target is not None else rows, weight, rows, grad if need_grad else student,
            n_cols, 1.0 / float(temperature), float(alpha), beta_f, float(scale), log_beta, log_1m_beta,
            int(ignore_index), KIND=_KINDS[kind], HAS_TARGET=target is not None,
            HAS_CE=target is not None and alpha < 1,
            NEED_GRAD=bool(need_grad), G_DTYPE=tl_dtype(student.dtype), BLOCK_V=block,
            num_warps=4 if block <= 1024 else (8 if block <= 2048 else 16))
    else:
        rows.zero_()
    if reduction == "none":
        return rows.to(student.dtype), grad
    total = rows.sum()
    if reduction in ("batchmean", "mean"):
        total = total / (max(count, 1) if isinstance(count, int) else count.clamp_min(1))
    return total.to(student.dtype), grad
