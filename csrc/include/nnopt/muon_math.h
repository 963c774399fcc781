// Muon's element-wise steps (torch.optim.Muon's for-loop path, op for op), shared by the CPU
// (csrc/cpu/fused_muon.cpp) and CUDA (csrc/cuda/fused_muon.cu) kernels; reference: nnopt/reference/fused_optim.py.
#pragma once

#include "nnopt/optim_math.h"

namespace nnopt {
namespace optim {

// Momentum step of one element: g unscaled (0 where masked), buf = lerp(buf, g, 1 - momentum) (0 where masked);
// returns the update lerp(g, buf, momentum) (nesterov) or buf.
template <typename T>
NNOPT_HD inline T muon_momentum_elem(T g, T& buf, bool keep, T scale, T one_minus_momentum, T momentum,
                                     bool nesterov) {
  g = keep ? g / scale : T(0);
  buf = lerp(buf, g, one_minus_momentum);
  buf = keep ? buf : T(0);
  return nesterov ? lerp(g, buf, momentum) : buf;
}

// Parameter step of one element: p * decay, plus alpha * u (torch's add_ with alpha: one fma), L1, mask.
template <typename T>
NNOPT_HD inline T muon_update_elem(T p, T u, bool keep, T decay, T alpha, T l1_thr) {
  p = l1_prox(fma_(alpha, u, p * decay), l1_thr);
  return keep ? p : T(0);
}

}  // namespace optim
}  // namespace nnopt
