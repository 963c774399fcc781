"""Reference optimizer steps in plain PyTorch: the oracle every backend is tested against, and the `torch` backend.

Each function updates its lists in place and follows torch.optim's single-tensor (for-loop) path op for op, so
float32 results agree with torch.optim to rounding. The signatures are the contract every backend implements
(see csrc/ops.cpp for the conventions: parallel lists, empty optional lists, masks, L1, grad_scale/found_inf,
a `step` tensor in place of the count-derived floats).

Math, per element, with g the gradient (divided by grad_scale; negated when maximize; 0 where masked),
p the parameter (its fp32 master copy when masters are given) and lr the learning rate:

SGD      g += wd*p; if momentum: buf = g (first step) or momentum*buf + (1-dampening)*g;
         g = g + momentum*buf (nesterov) or buf;  p += -lr*g
Adam     if wd: p *= 1 - lr*wd (decoupled, AdamW) or g += wd*p;  m = lerp(m, g, 1-beta1);
         v = v*beta2 + (1-beta2)*g*g;  vmax = max(vmax, v) (amsgrad);
         p += -(lr/bc1) * m / (sqrt(v or vmax)/bc2_sqrt + eps)
Adagrad  g += wd*p;  s += g*g;  p += -(lr/lr_decay_denom) * g / (sqrt(s) + eps)
RMSprop  g += wd*p;  v = v*alpha + (1-alpha)*g*g;  ga = lerp(ga, g, 1-alpha) (centered);
         avg = sqrt(v - ga*ga (centered) or v) + eps;
         buf = buf*momentum + g/avg; p += -lr*buf (momentum > 0)  or  p += -lr * g/avg
then     p = sign(p) * max(|p| - lr*l1, 0) (l1 > 0); masked entries of p, master and states = 0.

Shapes: any; dtypes: params/grads float32, float64, bfloat16 or float16; states float32 when masters are
given, else the params' dtype; masks bool.
"""

import math

import torch


def _lr(lr, lr_tensor):
    return lr if lr_tensor is None else lr_tensor.reshape(()).to(torch.float64).item()


def _step(step):
    """A step-count tensor's value (the count after this step's increment), as torch.optim reads it."""
    return step.reshape(()).to(torch.float64).item()


def _skip(found_inf):
    return found_inf is not None and bool(found_inf.reshape(()).item() != 0)


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prologue(i, params, grads, masters, masks, grad_scale, maximize):
    """Returns (p, g, mask) in the compute dtype for parameter i."""
    p = masters[i] if masters else params[i]
    cd = _compute_dtype(params[i])
    p = p.to(cd)
    g = grads[i].to(cd)
    if grad_scale is not None:
        g = g / grad_scale.reshape(()).to(cd)
    if maximize:
        g = -g
    mask = masks[i] if masks else None
    if mask is not None:
        g = g.masked_fill(~mask, 0)
    return p, g, mask


def _epilogue(i, p, states, lr, l1, params, masters, mask):
    """Applies L1 and the mask, then writes p (and its master) and the states back in place."""
    if l1 > 0:
        p = p.sign() * (p.abs() - lr * l1).clamp_min(0)
    if mask is not None:
        p = p.masked_fill(~mask, 0)
        states = [(dst, s.masked_fill(~mask, 0)) for dst, s in states]
    for dst, s in states:
        dst.copy_(s)
    if masters:
        masters[i].copy_(p)
    params[i].copy_(p)


def _lerp(a, b, w):
    return torch.lerp(a, b, w)


def sgd_step(params, grads, momentum_buffers, masters, masks, *, lr, momentum, dampening, nesterov,
             weight_decay, maximize, l1, first_step, lr_tensor=None, grad_scale=None, found_inf=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        states = []
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if first_step:
                buf = g.clone()
            else:
                buf = momentum_buffers[i].to(g.dtype).mul(momentum).add_(g, alpha=1 - dampening)
            states.append((momentum_buffers[i], buf))
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p = p.add(g, alpha=-lr)
        _epilogue(i, p, states, lr, l1, params, masters, mask)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, amsgrad, maximize, l1, bias_correction1, bias_correction2_sqrt,
              lr_tensor=None, grad_scale=None, found_inf=None, step=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    if step is not None:
        s = _step(step)
        bias_correction1, bias_correction2_sqrt = 1 - beta1**s, math.sqrt(1 - beta2**s)
    step_size = lr / bias_correction1
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        if weight_decay != 0:
            if decoupled:
                p = p.mul(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m = _lerp(exp_avgs[i].to(g.dtype), g, 1 - beta1)
        v = exp_avg_sqs[i].to(g.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
        states = [(exp_avgs[i], m), (exp_avg_sqs[i], v)]
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(g.dtype), v)
            states.append((max_exp_avg_sqs[i], vmax))
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p = p.addcdiv(m, denom, value=-step_size)
        _epilogue(i, p, states, lr, l1, params, masters, mask)


def adagrad_step(params, grads, state_sums, masters, masks, *, lr, weight_decay, eps, maximize, l1, lr_decay_denom,
                 lr_tensor=None, grad_scale=None, found_inf=None, lr_decay=0.0, step=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    if step is not None:
        lr_decay_denom = 1 + (_step(step) - 1) * lr_decay
    clr = lr / lr_decay_denom
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        s = state_sums[i].to(g.dtype).addcmul(g, g, value=1)
        std = s.sqrt().add_(eps)
        p = p.addcdiv(g, std, value=-clr)
        _epilogue(i, p, [(state_sums[i], s)], lr, l1, params, masters, mask)


def rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, masters, masks, *, lr, alpha, eps,
                 weight_decay, momentum, centered, maximize, l1, lr_tensor=None, grad_scale=None, found_inf=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        v = square_avgs[i].to(g.dtype).mul(alpha).addcmul_(g, g, value=1 - alpha)
        states = [(square_avgs[i], v)]
        if centered:
            ga = _lerp(grad_avgs[i].to(g.dtype), g, 1 - alpha)
            states.append((grad_avgs[i], ga))
            avg = v.addcmul(ga, ga, value=-1).sqrt_()
        else:
            avg = v.sqrt()
        avg = avg.add_(eps)
        if momentum > 0:
            buf = momentum_buffers[i].to(g.dtype).mul(momentum).addcdiv_(g, avg)
            states.append((momentum_buffers[i], buf))
            p = p.add(buf, alpha=-lr)
        else:
            p = p.addcdiv(g, avg, value=-lr)
        _epilogue(i, p, states, lr, l1, params, masters, mask)


# NAdam, RAdam, Adamax (torch.optim's for-loop path) and Lion (Chen et al. 2023), per element:
#
# NAdam   wd as Adam;  m = lerp(m, g, 1-beta1);  v = v*beta2 + (1-beta2)*g*g;  denom = sqrt(v/bc2) + eps;
#         p += (-lr*(1-mu)/(1-mu_product)) * g/denom;  p += (-lr*mu_next/(1-mu_product*mu_next)) * m/denom
# RAdam   wd as Adam;  m, v as Adam;  x = (m/bc1)*lr;
#         p -= (x * (1/(sqrt(v)+eps))*bc2_sqrt) * rect  (rect > 0: rho_t > 5)   or   p -= x
# Adamax  g += wd*p;  m = lerp(m, g, 1-beta1);  u = max(u*beta2, |g| + eps);  p += -(lr/bc1) * m/u
# Lion    p *= 1 - lr*wd;  p -= lr * sign(beta1*m + (1-beta1)*g);  m = beta2*m + (1-beta2)*g


def nadam_scalars(beta1, beta2, momentum_decay, step):
    """(bias_correction2, mu, mu_next) for step count ``step``, as torch.optim.NAdam computes them."""
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    return 1 - beta2**step, mu, mu_next


def radam_scalars(beta1, beta2, step):
    """(bias_correction1, bias_correction2_sqrt, rect) for step count ``step``, as torch.optim.RAdam computes
    them; rect is 0.0 when rho_t <= 5 (the unrectified branch)."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bc2
    rect = 0.0
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    return bc1, bc2**0.5, rect


def _adam_like_prologue(i, params, grads, masters, masks, grad_scale, maximize, lr, weight_decay, decoupled):
    p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
    if weight_decay != 0:
        if decoupled:
            p = p.mul(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    return p, g, mask


def nadam_step(params, grads, exp_avgs, exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps, weight_decay,
               decoupled, maximize, l1, momentum_decay, bias_correction2, mu, mu_next, mu_product, lr_tensor=None,
               grad_scale=None, found_inf=None, step=None, mu_product_tensor=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    if step is not None:
        bias_correction2, mu, mu_next = nadam_scalars(beta1, beta2, momentum_decay, _step(step))
    if mu_product_tensor is not None:
        mu_product = _step(mu_product_tensor)
    c_grad = -lr * (1.0 - mu) / (1.0 - mu_product)
    c_avg = (-lr * mu_next) / (1.0 - mu_product * mu_next)
    for i in range(len(params)):
        p, g, mask = _adam_like_prologue(i, params, grads, masters, masks, grad_scale, maximize, lr, weight_decay,
                                         decoupled)
        m = _lerp(exp_avgs[i].to(g.dtype), g, 1 - beta1)
        v = exp_avg_sqs[i].to(g.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(bias_correction2).sqrt().add_(eps)
        p = p.addcdiv(g, denom, value=c_grad).addcdiv_(m, denom, value=c_avg)
        _epilogue(i, p, [(exp_avgs[i], m), (exp_avg_sqs[i], v)], lr, l1, params, masters, mask)


def radam_step(params, grads, exp_avgs, exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps, weight_decay,
               decoupled, maximize, l1, bias_correction1, bias_correction2_sqrt, rect, lr_tensor=None,
               grad_scale=None, found_inf=None, step=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    if step is not None:
        bias_correction1, bias_correction2_sqrt, rect = radam_scalars(beta1, beta2, _step(step))
    for i in range(len(params)):
        p, g, mask = _adam_like_prologue(i, params, grads, masters, masks, grad_scale, maximize, lr, weight_decay,
                                         decoupled)
        m = _lerp(exp_avgs[i].to(g.dtype), g, 1 - beta1)
        v = exp_avg_sqs[i].to(g.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
        x = m / bias_correction1 * lr
        if rect > 0:
            x = x * (bias_correction2_sqrt / v.sqrt().add_(eps)) * rect
        p = p.add(x, alpha=-1.0)
        _epilogue(i, p, [(exp_avgs[i], m), (exp_avg_sqs[i], v)], lr, l1, params, masters, mask)


def adamax_step(params, grads, exp_avgs, exp_infs, masters, masks, *, lr, beta1, beta2, eps, weight_decay, maximize,
                l1, bias_correction1, lr_tensor=None, grad_scale=None, found_inf=None, step=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    if step is not None:
        bias_correction1 = 1 - beta1 ** _step(step)
    clr = lr / bias_correction1
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m = _lerp(exp_avgs[i].to(g.dtype), g, 1 - beta1)
        u = torch.maximum(exp_infs[i].to(g.dtype).mul(beta2), g.abs().add_(eps))
        p = p.addcdiv(m, u, value=-clr)
        _epilogue(i, p, [(exp_avgs[i], m), (exp_infs[i], u)], lr, l1, params, masters, mask)


def lion_step(params, grads, exp_avgs, masters, masks, *, lr, beta1, beta2, weight_decay, maximize, l1,
              lr_tensor=None, grad_scale=None, found_inf=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        if weight_decay != 0:
            p = p.mul(1 - lr * weight_decay)
        m = exp_avgs[i].to(g.dtype)
        p = p.add(m.mul(beta1).add_(g, alpha=1 - beta1).sign_(), alpha=-lr)
        m = m.mul(beta2).add_(g, alpha=1 - beta2)
        _epilogue(i, p, [(exp_avgs[i], m)], lr, l1, params, masters, mask)


# LAMB (You et al. 2020) as apex's FusedLAMB. g /= clip, clip = ||g_all|| / max_grad_norm when that exceeds 1
# (||g_all||: the global norm of every gradient of the optimizer, unscaled);
#   L2 mode: g += wd*p;  m = beta1*m + beta3*g (beta3 = 1-beta1 with grad_averaging, else 1);
#   v = beta2*v + (1-beta2)*g*g;  u = (m/bc1) / (sqrt(v/bc2) + eps)  (+ wd*p in adam_w_mode);
#   ratio = lr * ||p|| / ||u|| when both are nonzero and (wd != 0 or use_nvlamb), else lr;  p -= ratio * u.
# Masked entries count as 0 in u and in both norms.


def l2_norms(tensors):
    """Per-tensor L2 norms, float32 [len(tensors)] (sums of squares in float64)."""
    return torch.stack([t.detach().to(torch.float64).pow(2).sum().sqrt() for t in tensors]).to(torch.float32)


def lamb_clip(grad_norm, grad_scale, max_grad_norm):
    """The divisor of the gradients from the global norm of the scaled gradients (a float)."""
    if grad_norm is None:
        return 1.0
    norm = grad_norm.reshape(()).to(torch.float64).item()
    if grad_scale is not None:
        norm = norm / grad_scale.reshape(()).to(torch.float64).item()
    return norm / max_grad_norm if max_grad_norm > 0 and norm > max_grad_norm else 1.0


def lamb_step(params, grads, exp_avgs, exp_avg_sqs, masters, masks, *, lr, beta1, beta2, eps, weight_decay,
              adam_w_mode, grad_averaging, use_nvlamb, bias_correction, max_grad_norm, maximize, l1, bias_correction1,
              bias_correction2, lr_tensor=None, grad_scale=None, found_inf=None, step=None, grad_norm=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    if step is not None:
        s = _step(step)
        bias_correction1, bias_correction2 = (1 - beta1**s, 1 - beta2**s) if bias_correction else (1.0, 1.0)
    clip = lamb_clip(grad_norm, grad_scale, max_grad_norm)
    beta3 = 1 - beta1 if grad_averaging else 1.0
    trust = use_nvlamb or weight_decay != 0
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        g = g / clip
        if not adam_w_mode:
            g = g.add(p, alpha=weight_decay)
        m = exp_avgs[i].to(g.dtype).mul(beta1).add_(g, alpha=beta3)
        v = exp_avg_sqs[i].to(g.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
        if mask is not None:
            m, v = m.masked_fill(~mask, 0), v.masked_fill(~mask, 0)
        u = (m / bias_correction1) / ((v / bias_correction2).sqrt() + eps)
        if adam_w_mode:
            u = u.add(p, alpha=weight_decay)
        pk = p
        if mask is not None:
            u, pk = u.masked_fill(~mask, 0), p.masked_fill(~mask, 0)
        p_norm = pk.to(torch.float64).norm().item()
        u_norm = u.to(torch.float64).norm().item()
        ratio = lr * (p_norm / u_norm) if trust and p_norm != 0 and u_norm != 0 else lr
        p = p.add(u, alpha=-ratio)
        _epilogue(i, p, [(exp_avgs[i], m), (exp_avg_sqs[i], v)], lr, l1, params, masters, mask)


# Adafactor as torch.optim.Adafactor (for-loop path), per tensor, with s the step count after this step's increment:
#   w = s**beta2_decay;  rho = min(lr, 1/sqrt(s));  alpha = max(eps2, ||p||/sqrt(numel)) * rho  (p before decay);
#   p *= 1 - lr*wd;  factored (dim >= 2, R x C matrices in the last two dims):
#   row_var = lerp(row_var, ||g_row||²/C, w);  col_var = lerp(col_var, ||g_col||²/R, w);
#   var = row_var[r]*col_var[c] / max(mean_r(row_var), eps1);  else variance = lerp(variance, g², w), var = variance;
#   u = g / sqrt(max(var, eps1²));  p += (-alpha / max(1, RMS(u)/d)) * u.
# Masked entries count as 0 in g, ||p|| and ||u||; a masked parameter's `variance` entries are 0 too (row_var and
# col_var are not per-element: they keep the statistics of the unmasked entries).


def adafactor_scalars(lr, beta2_decay, step):
    """(one_minus_beta2, rho) for step count ``step``, as torch.optim.Adafactor computes them (Python floats)."""
    return step**beta2_decay, min(lr, 1 / (step**0.5))


def adafactor_step(params, grads, row_vars, col_vars, masters, masks, *, lr, beta2_decay, eps1, eps2, d,
                   weight_decay, maximize, l1, step_count, lr_tensor=None, grad_scale=None, found_inf=None,
                   step=None):
    """Adafactor on every tensor of ``params`` in place. For a parameter of 2 or more dims, ``row_vars[i]``
    [..., R, 1] and ``col_vars[i]`` [..., 1, C] are its factored second moments; for fewer dims ``row_vars[i]`` is
    its full ``variance`` (the parameter's shape) and ``col_vars[i]`` an empty tensor. ``step_count``: the count
    after this step's increment (a ``step`` tensor replaces it)."""
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    s = _step(step) if step is not None else float(step_count)
    one_minus_beta2, rho = adafactor_scalars(lr, beta2_decay, s)
    for i in range(len(params)):
        p, g, mask = _prologue(i, params, grads, masters, masks, grad_scale, maximize)
        shape, numel = params[i].shape, params[i].numel()
        p, g = p.reshape(shape), g.reshape(shape)
        if mask is not None:
            mask = mask.reshape(shape)
        pk = p if mask is None else p.masked_fill(~mask, 0)
        alpha = max(eps2, pk.norm(2).item() / (numel**0.5)) * rho
        if weight_decay != 0:
            p = p.mul(1 - lr * weight_decay)
        states = []
        if len(shape) > 1:
            row = row_vars[i].to(g.dtype).lerp(torch.norm(g, dim=-1, keepdim=True).square_().div_(shape[-1]),
                                               one_minus_beta2)
            col = col_vars[i].to(g.dtype).lerp(torch.norm(g, dim=-2, keepdim=True).square_().div_(shape[-2]),
                                               one_minus_beta2)
            states += [(row_vars[i], row), (col_vars[i], col)]
            var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            v = row_vars[i].to(g.dtype).reshape(shape).lerp(g * g, one_minus_beta2)
            if mask is not None:
                v = v.masked_fill(~mask, 0)
            states.append((row_vars[i], v))
            var = v.clone()
        u = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
        denom = max(1.0, u.norm(2).item() / ((numel**0.5) * d))
        p = p.add(u, alpha=-alpha / denom)
        _epilogue(i, p, [], lr, l1, params, masters, mask)
        for dst, st in states:
            dst.copy_(st.reshape(dst.shape))


# Muon (torch.optim.Muon) around its Newton–Schulz chain, per element: momentum step
#   g /= grad_scale, 0 where masked;  buf = lerp(buf, g, 1 - momentum) (0 where masked);
#   update = lerp(g, buf, momentum) (nesterov) or buf, written in the updates' dtype (bf16 for Newton–Schulz);
# then, on the orthogonalised updates o, the parameter step
#   p *= 1 - lr*wd;  p += -(lr * lr_ratios[i]) * o;  L1;  0 where masked.


def muon_momentum(grads, momentum_buffers, updates, masks, *, momentum, nesterov, grad_scale=None, found_inf=None):
    if _skip(found_inf):
        return
    for i in range(len(grads)):
        cd = _compute_dtype(grads[i])
        g = grads[i].to(cd)
        if grad_scale is not None:
            g = g / grad_scale.reshape(()).to(cd)
        mask = masks[i] if masks else None
        if mask is not None:
            g = g.masked_fill(~mask, 0)
        buf = momentum_buffers[i].to(cd).lerp(g, 1 - momentum)
        if mask is not None:
            buf = buf.masked_fill(~mask, 0)
        momentum_buffers[i].copy_(buf)
        updates[i].copy_(g.lerp(buf, momentum) if nesterov else buf)


def muon_update(params, updates, masters, masks, *, lr, weight_decay, lr_ratios, l1, lr_tensor=None,
                found_inf=None):
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i in range(len(params)):
        cd = _compute_dtype(params[i])
        p = (masters[i] if masters else params[i]).to(cd)
        p = p.mul(1 - lr * weight_decay).add(updates[i].to(cd), alpha=-(lr * lr_ratios[i]))
        _epilogue(i, p, [], lr, l1, params, masters, masks[i] if masks else None)
