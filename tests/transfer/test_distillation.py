"""nnopt.transfer.DistillationLoss and distill: the module against the float64 reference through autograd on every
backend (leading dimensions, grad_output scaling, every reduction, ignored rows, teacher constants), the errors a
user sees for bad input (each naming the argument), and a distilled student on scikit-learn's digits.
"""

import pytest
import torch
import torch.nn.functional as F

from nnopt import backends
from nnopt.reference import distill_loss as ref
from nnopt.testing import assert_close
from nnopt.transfer import DistillationLoss, distill, distillation_loss
from tests.conftest import skip_unless_available

BACKENDS = ["torch", "cpu", "triton"]
V = 50


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    if backends.triton_missing() is None and not torch.cuda.is_available():
        from nnopt.kernels import distill_loss as tk

        monkeypatch.setattr(tk, "MAX_BLOCK_V", 16)


def make(lead=(3, 4), classes=V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*lead, classes, generator=gen)).requires_grad_()
    t = 2 * torch.randn(*lead, classes, generator=gen)
    y = torch.randint(0, classes, lead, generator=gen)
    y.view(-1)[::4] = -100
    return s, t, y


def reference(s, t, y, reduction="batchmean", temperature=2.0, alpha=0.3, kind="kl", beta=0.5, scale_by_t2=True):
    """The float64 reference loss and its autograd gradient for grad_output = 1 (per-row sum for "none")."""
    lead = s.shape[:-1]
    s64 = s.detach().double().reshape(-1, s.shape[-1])
    loss, grad = ref.distill_loss_fwd(s64, t.double().reshape(-1, s.shape[-1]), None if y is None else y.reshape(-1),
                                      temperature=temperature, alpha=alpha, kind=kind, beta=beta,
                                      scale=temperature ** 2 if scale_by_t2 else 1.0, ignore_index=-100,
                                      reduction=reduction)
    return (loss.reshape(lead) if reduction == "none" else loss), grad.reshape(s.shape)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_autograd_matches_reference(backend, kind):
    skip_unless_available(backend, "cpu", "distill_loss")
    for reduction in ("batchmean", "mean", "sum", "none"):
        s, t, y = make()
        loss_fn = DistillationLoss(temperature=2.0, alpha=0.3, kind=kind, beta=0.4, reduction=reduction,
                                   backend=backend)
        loss = loss_fn(s, t, y)
        want, want_grad = reference(s, t, y, reduction, kind=kind, beta=0.4)
        assert loss.shape == want.shape
        assert_close(loss, want, dtype=torch.float32, reduction_length=V)
        # grad_output scaling: a scalar, or per-row weights for "none"
        g = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape) if reduction == "none" else torch.tensor(2.5)
        loss.backward(g)
        want_scaled = want_grad * (g.double().unsqueeze(-1) if reduction == "none" else 2.5)
        assert_close(s.grad, want_scaled, dtype=torch.float32, reduction_length=V)
        assert bool((s.grad.reshape(-1, V)[::4] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_in_a_graph_and_constants(backend):
    """The loss composes with other terms; the teacher gets no gradient even when it requires one."""
    skip_unless_available(backend, "cpu", "distill_loss")
    s, t, y = make()
    t.requires_grad_()
    loss = 3.0 * distillation_loss(s, t, y, temperature=1.5, alpha=0.5, backend=backend) + s.sum()
    loss.backward()
    want, want_grad = reference(s, t, y, temperature=1.5, alpha=0.5)
    assert_close(s.grad, 3.0 * want_grad + 1.0, dtype=torch.float32, reduction_length=V)
    assert t.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_options(backend):
    skip_unless_available(backend, "cpu", "distill_loss")
    s, t, y = make(lead=(6,))
    # no targets with alpha = 1, no T² scaling, float64 teacher cast to the student's dtype, int32 targets
    loss = distillation_loss(s, t, None, temperature=3.0, alpha=1.0, scale_by_t2=False, backend=backend)
    assert_close(loss, reference(s, t, None, temperature=3.0, alpha=1.0, scale_by_t2=False)[0], dtype=torch.float32)
    loss = distillation_loss(s, t.double(), y.int(), temperature=3.0, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss, reference(s, t, y, temperature=3.0, alpha=0.5)[0], dtype=torch.float32)
    # every row ignored: 0 and zero gradients, not NaN
    loss = distillation_loss(s, t, torch.full((6,), -100), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((s.grad == 0).all())
    # a custom ignore_index; without grad mode the loss is the same
    y7 = y.clone()
    y7[y7 == -100] = 7
    with torch.no_grad():
        nograd = distillation_loss(s, t, y7, ignore_index=7, backend=backend)
    assert_close(nograd, reference(s, t, y7.masked_fill(y7 == 7, -100), temperature=1.0, alpha=0.5)[0],
                 dtype=torch.float32)


def test_matches_the_eager_composition():
    """With no ignored rows, the loss is what users write by hand: kl_div(log_target) + cross_entropy."""
    s, t, y = make(lead=(8,))
    y = y.clamp_min(0)
    T = 2.0
    want = 0.5 * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                          log_target=True) * T * T + 0.5 * F.cross_entropy(s, y)
    (want_grad,) = torch.autograd.grad(want, s)
    got = DistillationLoss(temperature=T)(s, t, y)
    got.backward()
    assert_close(got, want.detach(), reduction_length=V)
    assert_close(s.grad, want_grad, reduction_length=V)


def test_second_backward_raises():
    s, t, y = make()
    loss = DistillationLoss(backend="torch")(s, t, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_name_the_argument():
    s, t, y = make()
    for kwargs, name in [(dict(temperature=0), "temperature"), (dict(temperature=-2.0), "temperature"),
                         (dict(temperature=float("inf")), "temperature"), (dict(alpha=-0.1), "alpha"),
                         (dict(alpha=1.2), "alpha"), (dict(beta=2.0), "beta"), (dict(kind="kld"), "kind"),
                         (dict(reduction="avg"), "reduction")]:
        with pytest.raises(ValueError, match=name):
            DistillationLoss(**kwargs)
        with pytest.raises(ValueError, match=name):
            distillation_loss(s, t, y, **kwargs)
    with pytest.raises(TypeError, match="temperature"):
        DistillationLoss(temperature="2")
    with pytest.raises(TypeError, match="ignore_index"):
        DistillationLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match="backend"):
        DistillationLoss(backend="fast")
    loss = DistillationLoss()
    with pytest.raises(ValueError, match="teacher_logits"):
        loss(s, t[..., :10], y)
    with pytest.raises(ValueError, match="target"):
        loss(s, t, y[:2])
    with pytest.raises(ValueError, match="target is required"):
        loss(s, t)
    with pytest.raises(TypeError, match="target"):
        loss(s, t, y.float())
    with pytest.raises(TypeError, match="student_logits"):
        loss(y, t, y)
    with pytest.raises(TypeError, match="teacher_logits"):
        loss(s, [1.0], y)
    with pytest.raises(ValueError, match="student_logits"):
        loss(torch.tensor(1.0), torch.tensor(1.0))


def test_auto_backend_and_float64():
    """auto runs the C++ kernel on CPU float32 where it is built, and float64 on the reference (exact)."""
    s, t, y = make()
    s64 = s.detach().double().requires_grad_()
    loss = DistillationLoss(temperature=2.0, alpha=0.3)(s64, t.double(), y)
    loss.backward()
    want, want_grad = reference(s, t, y)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(s64.grad, want_grad)
    assert_close(DistillationLoss(temperature=2.0, alpha=0.3)(s, t, y), want, dtype=torch.float32)


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    order = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    batches = [(x[order[i:i + 32]], y[order[i:i + 32]]) for i in range(0, len(order), 32)]
    return batches, [(x[test], y[test])]


def _mlp(widths, seed, dropout=0.0):
    torch.manual_seed(seed)
    layers, d = [], 64
    for w in widths:
        layers += [torch.nn.Linear(d, w), torch.nn.ReLU()] + ([torch.nn.Dropout(dropout)] if dropout else [])
        d = w
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, 10))


def _size(model):
    return sum(p.numel() for p in model.parameters())


def test_distilled_student_on_digits():
    """A 4.8k-parameter student distilled from an 85k-parameter teacher (T = 4, alpha = 0.7, the fused CPU loss)
    either beats the same student trained on the labels alone for the same steps, or comes within 1 point of the
    teacher's accuracy while being >= 4x smaller."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = _digits()

        def cross_entropy(s, t, y):
            return F.cross_entropy(s, y)

        teacher = _mlp((256, 256), 0, dropout=0.5)
        opt = torch.optim.Adam(teacher.parameters(), 1e-3, weight_decay=1e-4)
        # distill() with a loss that ignores the teacher is plain supervised training: the teacher trains itself
        teacher_acc = distill(teacher, teacher, train, opt, 30, loss=cross_entropy, progress=False,
                              eval_data=test)[-1]["accuracy"]
        assert teacher_acc > 0.95
        base, student = _mlp((64,), 1), _mlp((64,), 1)
        base_acc = distill(base, teacher, train, torch.optim.Adam(base.parameters(), 3e-3), 30, loss=cross_entropy,
                           progress=False, eval_data=test)[-1]["accuracy"]
        history = distill(student, teacher, train, torch.optim.Adam(student.parameters(), 3e-3), 30,
                          loss=DistillationLoss(temperature=4.0, alpha=0.7), progress=False, eval_data=test)
    finally:
        torch.set_num_threads(threads)
    kd_acc = history[-1]["accuracy"]
    assert [h["epoch"] for h in history] == list(range(1, 31))
    assert history[-1]["loss"] < history[0]["loss"]
    assert _size(teacher) >= 4 * _size(student)
    print(f"digits: teacher {teacher_acc:.4f}, student alone {base_acc:.4f}, distilled {kd_acc:.4f}")
    assert kd_acc > base_acc or kd_acc >= teacher_acc - 0.01, (kd_acc, base_acc, teacher_acc)


def test_distill_loop_contract(capsys):
    """Modes are restored, targets are optional with alpha = 1, progress prints one line per epoch without tqdm."""
    x = torch.randn(40, 6)
    teacher, student = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    teacher.train()
    student.eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    history = distill(student, teacher, [x[:20], x[20:]], opt, 3, loss=DistillationLoss(alpha=1.0), progress=True)
    assert len(history) == 3 and set(history[0]) == {"epoch", "loss", "seconds"}
    assert history[-1]["loss"] < history[0]["loss"]
    assert teacher.training and not student.training
    assert teacher.weight.grad is None
    out = capsys.readouterr().out
    try:
        import tqdm  # noqa: F401
    except ImportError:
        assert out.count("distill: epoch") == 3
    with pytest.raises(ValueError, match="epochs"):
        distill(student, teacher, [x], opt, -1)
    with pytest.raises(ValueError, match="target is required"):
        distill(student, teacher, [x], opt, 1, progress=False)  # the default loss has alpha = 0.5


# ------------------------------------------------------------------------------------ transformers outputs
def test_model_outputs_with_logits_are_accepted():
    """A transformers ModelOutput (anything with a tensor .logits) is the same as its logits."""
    transformers = pytest.importorskip("transformers")
    s, t, y = make()
    out_s = transformers.modeling_outputs.CausalLMOutput(logits=s)
    out_t = transformers.modeling_outputs.CausalLMOutput(logits=t)
    want = distillation_loss(s, t, y, backend="torch")
    assert torch.equal(distillation_loss(out_s, out_t, y, backend="torch"), want)
    assert torch.equal(DistillationLoss(backend="torch")(out_s, t, y), want)


def test_vocabulary_mismatch_names_both_sizes_and_shared_slices():
    s, t, y = make()
    y = y.clamp(max=39).masked_fill(y < 0, -100)
    loss = DistillationLoss(backend="torch")
    with pytest.raises(ValueError, match=r"vocabulary mismatch: student_logits has 50 classes, teacher_logits 40"):
        loss(s, t[..., :40], y)
    shared = DistillationLoss(backend="torch", vocab="shared")
    got = shared(s, t[..., :40], y)
    want = distillation_loss(s[..., :40], t[..., :40], y, backend="torch")
    assert torch.equal(got, want)
    got.backward()
    assert bool((s.grad[..., 40:] == 0).all()) and bool((s.grad[..., :40] != 0).any())
    y2 = y.clone()
    y2.view(-1)[1] = 45
    with pytest.raises(ValueError, match="keeps classes 0..39, but target holds class 45"):
        shared(s, t[..., :40], y2)
    with pytest.raises(ValueError, match="vocab"):
        DistillationLoss(vocab="slice")


@pytest.mark.usefixtures("one_thread")
def test_distill_gpt2_teacher_into_smaller_gpt2():
    """distill end to end on transformers GPT-2 models with the fused loss: dict inputs, ModelOutputs, shifted
    byte targets; the student moves towards the teacher."""
    from tests.transfer._hf import VOCAB, build

    teacher = build("gpt2", hidden=32, layers=2, ff=64)
    student = build("gpt2", hidden=16, layers=1, heads=2, ff=32, seed=3)
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, VOCAB, (8, 13), generator=gen)
    data = [({"input_ids": seqs[i:i + 4, :-1]}, seqs[i:i + 4, 1:]) for i in (0, 4)]

    def kl_to_teacher():
        with torch.no_grad():
            x = {"input_ids": seqs[:, :-1]}
            return float(distillation_loss(student(**x), teacher(**x), alpha=1.0, backend="torch"))

    before = kl_to_teacher()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    loss = DistillationLoss(alpha=1.0, temperature=2.0)
    history = distill(student, teacher, data, opt, 8, loss=loss, progress=False)
    assert len(history) == 8 and history[-1]["loss"] < history[0]["loss"]
    assert kl_to_teacher() < 0.5 * before
    acc = distill(student, teacher, data, opt, 1, progress=False, eval_data=data)[-1]["accuracy"]
    assert 0.0 <= acc <= 1.0
