// Every operator schema of nnopt._C, in one place. Device files register implementations with
// TORCH_LIBRARY_IMPL(nnopt, CPU|CUDA, m); nnopt/_ext.py registers the fake (meta) kernels for torch.compile.
//
// Fused optimizer steps (family: fused_optim). Conventions shared by all four:
// - Tensor lists are parallel: index i of every non-empty list describes the same parameter. An optional
//   list (momentum buffers, max_exp_avg_sqs, masters, masks, ...) is either empty or as long as params.
// - Every tensor is contiguous; all are on one device; params and grads share one floating dtype; states
//   are float32 when masters are given (bf16/fp16 params with an fp32 master copy), else the params' dtype.
//   masks are bool. Math runs in float32 (float64 for float64 params).
// - lr_tensor (one element, float32, same device) replaces lr when given, read inside the kernel.
// - step (Adam, Adagrad; one element, same device): the step count after this step's increment. When given,
//   the count-derived scalars (bias corrections; Adagrad's lr_decay_denom from lr_decay) are computed from
//   it inside the kernel and the float arguments for them are ignored: counts can live on the device.
// - grad_scale (one element): grads are divided by it. found_inf (one element): when nonzero the step
//   changes nothing. Neither is read on the host.
// - After the update: the L1 proximal step p <- sign(p) * max(|p| - lr*l1, 0) when l1 > 0, then masked
//   entries (mask == false) of the parameter, the master and every state are set to exactly 0; the
//   gradient of a masked entry counts as 0.
#include <torch/library.h>

TORCH_LIBRARY(nnopt, m) {
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] masters, "
      "Tensor[] masks, *, float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, float l1, bool first_step, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor[] masks, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, float l1, "
      "float bias_correction1, float bias_correction2_sqrt, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? step=None) -> ()");
  m.def(
      "adagrad_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] masters, "
      "Tensor[] masks, *, float lr, float weight_decay, float eps, bool maximize, float l1, "
      "float lr_decay_denom, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "float lr_decay=0.0, Tensor? step=None) -> ()");
  m.def(
      "rmsprop_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] grad_avgs, Tensor(e!)[] masters, Tensor[] masks, *, "
      "float lr, float alpha, float eps, float weight_decay, float momentum, bool centered, bool maximize, "
      "float l1, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // NAdam, RAdam, Adamax (torch.optim's math) and Lion (Chen et al. 2023), same conventions. Count-derived
  // floats (NAdam: bias_correction2, mu, mu_next; RAdam: bias_correction1, bias_correction2_sqrt, rect, where
  // rect <= 0 selects the unrectified branch; Adamax: bias_correction1) are ignored when `step` is given. NAdam's
  // mu_product is the float32 product of the mu's including this step's (mu_product_tensor replaces it).
  m.def(
      "nadam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, Tensor[] masks, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool maximize, float l1, float momentum_decay, float bias_correction2, float mu, "
      "float mu_next, float mu_product, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? step=None, Tensor? mu_product_tensor=None) -> ()");
  m.def(
      "radam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, Tensor[] masks, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool maximize, float l1, float bias_correction1, float bias_correction2_sqrt, float rect, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? step=None) -> ()");
  m.def(
      "adamax_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_infs, "
      "Tensor(d!)[] masters, Tensor[] masks, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool maximize, float l1, float bias_correction1, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? step=None) -> ()");
  m.def(
      "lion_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] masters, "
      "Tensor[] masks, *, float lr, float beta1, float beta2, float weight_decay, bool maximize, float l1, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // LAMB as apex's FusedLAMB: one call runs pass 1 (moments; each tensor's ||p|| and ||u|| reduced over all
  // tensors at once) then pass 2 (p -= ratio * u, ratio = lr * ||p||/||u||; lr when a norm is 0, or when
  // weight_decay == 0 and not use_nvlamb). grad_norm (one element): the global norm of the (scaled) gradients;
  // they are divided by grad_norm / grad_scale / max_grad_norm when that exceeds 1 (max_grad_norm > 0).
  // bias_correction1/2 are 1 - beta**step (1 without bias_correction); a `step` tensor replaces them.
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, Tensor[] masks, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool adam_w_mode, bool grad_averaging, bool use_nvlamb, bool bias_correction, float max_grad_norm, "
      "bool maximize, float l1, float bias_correction1, float bias_correction2, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? step=None, Tensor? grad_norm=None) -> ()");
  // Adafactor as torch.optim.Adafactor. A parameter of 2+ dims (B matrices R x C in its last two dims) has
  // row_vars[i] (B*R entries) and col_vars[i] (B*C entries); one of fewer dims has its full variance in row_vars[i]
  // (numel entries) and an empty col_vars[i]. step_count is the count after this step's increment (a `step` tensor
  // replaces it). eps1 is resolved by the caller (torch's None: the machine epsilon of the states' dtype).
  m.def(
      "adafactor_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, Tensor(c!)[] col_vars, "
      "Tensor(d!)[] masters, Tensor[] masks, *, float lr, float beta2_decay, float eps1, float eps2, float d, "
      "float weight_decay, bool maximize, float l1, float step_count, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? step=None) -> ()");
  // Muon's element-wise steps around its Newton–Schulz chain (torch.optim.Muon). muon_momentum_: the momentum
  // buffers (states: float32 when the caller keeps fp32 masters, else the grads' dtype) and the update fed to
  // Newton–Schulz, written in the updates' dtype. muon_update_: p *= 1 - lr*wd; p -= lr * lr_ratios[i] * updates[i]
  // (the adjusted learning rate of each matrix), then L1 and masks as above.
  m.def(
      "muon_momentum_(Tensor[] grads, Tensor(a!)[] momentum_buffers, Tensor(b!)[] updates, Tensor[] masks, *, "
      "float momentum, bool nesterov, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "muon_update_(Tensor(a!)[] params, Tensor[] updates, Tensor(b!)[] masters, Tensor[] masks, *, float lr, "
      "float weight_decay, float[] lr_ratios, float l1, Tensor? lr_tensor=None, Tensor? found_inf=None) -> ()");
  // Per-tensor L2 norms of a list of contiguous floating tensors on one device: float32 [len(tensors)].
  m.def("l2_norms(Tensor[] tensors) -> Tensor");
  // The kept entries of masked tensors (compact optimizer states): kept_gather packs each src (contiguous, as many
  // elements as the bool mask) into [k] in the mask's row-major order, as torch.masked_select; kept_scatter_ writes
  // packed [k] back to dst's kept entries, as dst.masked_scatter_(mask, packed), and nothing else of dst.
  m.def("kept_gather(Tensor mask, Tensor[] srcs) -> Tensor[]");
  m.def("kept_scatter_(Tensor(a!) dst, Tensor mask, Tensor packed) -> ()");

  // Radix-select histogram (family: select), the primitive of nnopt/prune/_select.py: adds to hist (int64,
  // 2^bits bins, the scores' device) the count of eligible entries (mask true; a None mask = all) per value of
  // the field (key >> shift) & (2^bits - 1) of their order key (key_bits = 16, 32, 64), among the entries whose
  // key bits above the field equal prefix. magnitude: keys of |score| (L1 pruning without an abs() copy).
  // Scores and masks contiguous, one device; any floating dtype.
  m.def(
      "select_histogram_(Tensor(a!) hist, Tensor[] scores, Tensor?[] masks, int key_bits, int shift, int bits, "
      "int prefix, bool magnitude=False) -> ()");

  // Block-sparse masked linear layer (family: masked_linear): y = x (W ⊙ mask)ᵀ + b and its two gradients,
  // computed only on the non-empty block_n × block_k tiles of the mask. The block layout (nnopt/nn/layout.py)
  // lists those tiles: row_ptr [NB+1] / col_idx [nnzb] in block-row order (CSR), col_ptr [KB+1] / row_idx
  // [nnzb] in block-column order (CSC) with t_perm [nnzb] mapping a CSC entry to its CSR index, and full
  // [nnzb] (bool, CSR order): the tile, clipped to the matrix, is all true (no mask load needed). Index
  // tensors are int32. x [M, K], dy [M, N], weight and mask [N, K] (mask bool) contiguous, one device;
  // results are new tensors in the inputs' dtype (accumulated in float32, float64 for float64); masked
  // entries of weight are ignored even when nonzero, and dW is exactly 0 outside the mask.
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
      "Tensor full, int block_n, int block_k) -> Tensor");
  m.def(
      "masked_linear_dx(Tensor dy, Tensor weight, Tensor mask, Tensor col_ptr, Tensor row_idx, Tensor t_perm, "
      "Tensor full, int block_n, int block_k) -> Tensor");
  m.def(
      "masked_linear_dw(Tensor dy, Tensor x, Tensor mask, Tensor row_ptr, Tensor col_idx, Tensor full, "
      "int block_n, int block_k) -> Tensor");
  // Decode shapes (few rows of x): the listed tiles of W ⊙ mask packed once into panels (csrc/cpu/masked_gemv.cpp
  // says their order) in `dtype` (default: weight's; float64 only from float64), then y = x (W ⊙ mask)ᵀ + b
  // from the panels: x [M, K] and bias [N] of the panels' dtype, out_features = N, the layout's row_ptr/col_idx.
  m.def(
      "masked_linear_pack(Tensor weight, Tensor mask, Tensor row_ptr, Tensor col_idx, Tensor full, int block_n, "
      "int block_k, ScalarType? dtype=None) -> Tensor");
  m.def(
      "masked_linear_packed(Tensor x, Tensor packed, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
      "int out_features, int block_n, int block_k) -> Tensor");

  // Fused distillation loss (family: distill_loss; definitions: nnopt/reference/distill_loss.py): returns
  // (loss, d loss / d student) for student and teacher logits [B, V] (contiguous, one dtype, one device) and
  // target [B] int64 or None: per row alpha * scale * soft + (1 - alpha) * cross_entropy(student, target), soft
  // = KL(p_t || p_s), KL(p_s || p_t) or the beta-JSD of p_s = softmax(student / T), p_t = softmax(teacher / T);
  // rows with target == ignore_index drop out of both terms and of the batchmean/mean count. loss is 0-dim
  // ([B] for reduction "none") and grad [B, V] (empty when need_grad is false), both in the logits' dtype.
  m.def(
      "distill_loss_fwd(Tensor student, Tensor teacher, Tensor? target, *, float temperature, float alpha, "
      "str kind, float beta, float scale, int ignore_index, str reduction, bool need_grad=True) -> (Tensor, Tensor)");

  // SparseGPT's column-block update (family: oneshot; driver nnopt/prune/sparsegpt.py, oracle
  // nnopt/reference/oneshot.py): over the block's columns in order, prunes w [rows, count] where pruned is true
  // (N:M with m > 0: the m - n lowest w^2/u_jj^2 of each group are marked at its first column), writes each
  // column's error e = (w - q) / u_ii to err and subtracts e * u[i, i+1:] from the later columns; w ends pruned.
  // u [count, count] (w's dtype), pruned bool, err like w; all contiguous, float32 or float64.
  m.def("sparsegpt_block_(Tensor(a!) w, Tensor u, Tensor(b!) pruned, Tensor(c!) err, int n, int m) -> ()");
  // SparseGPT's calibration Hessian on bf16 matrix units (family: oneshot; oracle nnopt/reference/oneshot.py,
  // hessian_accumulate): h [K, K] float32 += the upper triangle (i <= j) of hiᵀhi (terms 1) or of
  // hiᵀhi + hiᵀlo + loᵀhi + diag(loᵀlo) (terms 3), hi = bf16(x), lo = bf16(x - hi), x [T, K] float32.
  // amx_bf16_usable: whether this process runs those products on AMX tiles (CPU capability + the OS's grant).
  m.def("hessian_accumulate_(Tensor(a!) h, Tensor x, int terms) -> ()");
  m.def("amx_bf16_usable() -> bool");
  // Optimizer steps with low-precision states (family: quant_optim; formats, quantizer and oracle:
  // nnopt/reference/quant_optim.py). `op` names the fused_optim step whose element update runs (sgd_step,
  // adam_step, adagrad_step, rmsprop_step); states<k>/scales<k> are its state slots in argument order (codes and
  // absmax per block for bits 8/4; float32/bfloat16 values for 32/16, scales empty), empty when the flags do not
  // use the slot. hyper/flags: the fused op's float/bool arguments in its schema order (lr first; l1 included;
  // grad_scale, found_inf, lr_tensor, step as there). qmap/mids: the quantizer's maps and midpoints on the
  // params' device (empty for bits 32/16). seed >= 0: bf16 parameters without masters are rounded stochastically.
  m.def(
      "quant_step_(str op, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states0, Tensor(c!)[] states1, "
      "Tensor(d!)[] states2, Tensor(e!)[] scales0, Tensor(f!)[] scales1, Tensor(g!)[] scales2, "
      "Tensor(h!)[] masters, Tensor[] masks, Tensor qmap, Tensor mids, *, int bits, int block_size, "
      "float[] hyper, int[] flags, int seed=-1, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? step=None) -> ()");
}

// `import nnopt._C` loads the library, which runs the registrations above; the module itself is empty.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
