"""transfer_parameters: exact reports for renamed, extra, missing and mismatched tensors; order matching;
conversions; masks; strict; atomicity; no garbage left in re-initialised tensors; bad input."""

import copy

import pytest
import torch
from torch import nn

from nnopt import sparsity
from nnopt.prune._contract import pruned_names
from nnopt.prune.methods import l1_unstructured
from nnopt.transfer.parameters import FALLBACK_STD, transfer_parameters
from nnopt.transfer.report import COPIED, MISSING, REINITIALISED, SLICED, TIED, TransferReport


class Old(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.enc = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, classes)
        self.aux = nn.Linear(2, 2)  # not in New: unused

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.enc(x))))


class New(nn.Module):
    def __init__(self, classes=5, device=None):
        super().__init__()
        self.encoder = nn.Linear(4, 8, device=device)
        self.norm = nn.BatchNorm1d(8, device=device)
        self.classifier = nn.Linear(8, classes, device=device)
        self.extra = nn.Linear(classes, 2, device=device)  # not in Old: missing

    def forward(self, x):
        return self.extra(self.classifier(torch.relu(self.norm(self.encoder(x)))))


RENAME = {r"^enc\.": "encoder.", r"^head\.(weight|bias)$": r"classifier.\1"}


def _trained(model):
    """Distinct running statistics, so copied buffers are recognisable."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return model


def _nan(model):
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) or (now[k].isnan().all() and v.isnan().all())
                                              for k, v in state.items())


def _status(report):
    return {e.target: (e.status, e.source) for e in report.entries}


def test_same_architecture_copies_everything():
    src, dst = _trained(Old()), Old()
    report = transfer_parameters(src, dst)
    assert isinstance(report, TransferReport)
    assert all(e.status == COPIED and e.source == e.target for e in report)
    assert report.unused == [] and report.complete
    assert report.counts == {COPIED: 11, SLICED: 0, REINITIALISED: 0, MISSING: 0, TIED: 0}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_regex_mapping_slice_report_is_exact():
    src, dst = _trained(Old()), _nan(New())
    report = transfer_parameters(src, dst, RENAME, on_mismatch="slice")
    assert _status(report) == {
        "encoder.weight": (COPIED, "enc.weight"), "encoder.bias": (COPIED, "enc.bias"),
        "norm.weight": (COPIED, "norm.weight"), "norm.bias": (COPIED, "norm.bias"),
        "norm.running_mean": (COPIED, "norm.running_mean"), "norm.running_var": (COPIED, "norm.running_var"),
        "norm.num_batches_tracked": (COPIED, "norm.num_batches_tracked"),
        "classifier.weight": (SLICED, "head.weight"), "classifier.bias": (SLICED, "head.bias"),
        "extra.weight": (MISSING, None), "extra.bias": (MISSING, None),
    }
    assert [e.target for e in report] == list(dst.state_dict())  # the target's order
    assert report.unused == ["aux.weight", "aux.bias"]
    assert report.counts == {COPIED: 7, SLICED: 2, REINITIALISED: 0, MISSING: 2, TIED: 0}
    e = report["classifier.weight"]
    assert (e.target_shape, e.source_shape) == ((5, 8), (3, 8))
    assert "[:3, :8]" in e.detail and "reset_parameters of Linear" in e.detail
    # the old classes keep their rows; the new rows are re-initialised, not left as garbage
    assert torch.equal(dst.classifier.weight[:3], src.head.weight)
    assert torch.equal(dst.classifier.bias[:3], src.head.bias)
    assert not dst.classifier.weight.isnan().any() and not dst.classifier.bias.isnan().any()
    assert torch.equal(dst.norm.running_var, src.norm.running_var) and int(dst.norm.num_batches_tracked) == 7
    assert dst.extra.weight.isnan().all()  # missing targets keep dst's values by default
    text = str(report)
    for word in ("target", "status", "classifier.weight", "sliced", "missing", "aux.weight", "7 copied"):
        assert word in text


def test_slice_into_a_smaller_target_crops():
    src, dst = Old(classes=5), _nan(New(classes=3))
    report = transfer_parameters(src, dst, RENAME, on_mismatch="slice")
    e = report["classifier.weight"]
    assert e.status == SLICED and "rest" not in e.detail
    assert torch.equal(dst.classifier.weight, src.head.weight[:3])


def test_skip_reinitialises_with_the_module_initialiser_over_garbage():
    src = Old()
    dst = torch.nn.utils.skip_init(New)  # uninitialised memory
    _nan(dst)
    report = transfer_parameters(src, dst, RENAME, on_mismatch="skip")
    for name in ("classifier.weight", "classifier.bias"):
        e = report[name]
        assert e.status == REINITIALISED and e.source == name.replace("classifier", "head")
        assert "(3, 8)" in report["classifier.weight"].detail or "(3,)" in e.detail
        assert "reset_parameters of Linear" in e.detail
    assert not dst.classifier.weight.isnan().any() and not dst.classifier.bias.isnan().any()
    bound = 1 / 8 ** 0.5  # Linear's own initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert dst.classifier.weight.abs().max() <= bound and dst.classifier.bias.abs().max() <= bound
    assert torch.equal(dst.encoder.weight, src.enc.weight)


class NoInit(nn.Module):
    """A module without an initialiser: the documented fallback applies."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.empty(6, 4))
        self.weight = nn.Parameter(torch.empty(4))
        self.shift = nn.Parameter(torch.empty(4))
        self.register_buffer("stat", torch.empty(4))


class HalfInit(nn.Module):
    """An initialiser that writes only one of its parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.empty(3, 3))
        self.b = nn.Parameter(torch.empty(3, 3))

    def reset_parameters(self):
        nn.init.ones_(self.a)


def test_fallback_initialisation_and_reinit_missing():
    dst = _nan(nn.Sequential(NoInit(), HalfInit(), nn.LayerNorm(4)))
    src = {"0.proj": torch.ones(2, 2)}  # mismatched: re-initialised
    report = transfer_parameters(src, dst, reinit_missing=True)
    assert report["0.proj"].status == REINITIALISED
    assert "normal(0, 0.02)" in report["0.proj"].detail and "has no initialiser" in report["0.proj"].detail
    assert report["0.weight"].status == MISSING and report["0.weight"].detail.startswith("ones")
    assert report["0.shift"].detail.startswith("zeros") and report["0.stat"].detail.startswith("zeros")
    assert report["1.a"].detail == "reset_parameters of HalfInit"
    assert report["1.b"].detail.startswith("normal(0, 0.02)") and "leaves it unset" in report["1.b"].detail
    assert report["2.weight"].detail == "reset_parameters of LayerNorm"
    for t in dst.state_dict().values():
        assert not t.isnan().any()
    assert torch.equal(dst[0].weight, torch.ones(4)) and torch.equal(dst[0].stat, torch.zeros(4))
    assert torch.equal(dst[1].a, torch.ones(3, 3))
    assert 0 < dst[0].proj.std() < 5 * FALLBACK_STD


def test_error_names_both_shapes_and_copies_nothing():
    src, dst = Old(), _nan(New())
    state = _state(dst)
    with pytest.raises(ValueError, match=r"classifier\.weight \(5, 8\) <- head\.weight \(3, 8\)") as info:
        transfer_parameters(src, dst, RENAME, on_mismatch="error")
    assert "classifier.bias (5,) <- head.bias (3,)" in str(info.value)
    assert _unchanged(dst, state)


def test_strict_lists_everything_and_copies_nothing():
    src, dst = Old(), _nan(New())
    state = _state(dst)
    with pytest.raises(RuntimeError) as info:
        transfer_parameters(src, dst, RENAME, on_mismatch="slice", strict=True)
    msg = str(info.value)
    for name in ("classifier.weight", "classifier.bias", "extra.weight", "extra.bias", "aux.weight", "aux.bias"):
        assert name in msg
    assert "encoder.weight" not in msg
    assert _unchanged(dst, state)
    assert transfer_parameters(Old(), Old(), strict=True).complete  # nothing to complain about: no error


class Exploding(nn.Linear):
    def reset_parameters(self):
        if hasattr(self, "armed"):
            raise RuntimeError("initialiser failed")
        super().reset_parameters()


def test_a_failing_initialiser_leaves_dst_untouched():
    dst = nn.Sequential(nn.Linear(4, 8), Exploding(8, 5))
    dst[1].armed = True
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    state = _state(dst)
    with pytest.raises(RuntimeError, match="initialiser failed"):
        transfer_parameters(src, dst)
    assert _unchanged(dst, state)


def test_bad_mappings_name_the_culprit_and_copy_nothing():
    src, dst = Old(), _nan(New())
    state = _state(dst)
    with pytest.raises(ValueError, match="matches no source tensor name") as info:
        transfer_parameters(src, dst, {**RENAME, r"^nothing\.": "x."})
    assert "nothing" in str(info.value)
    with pytest.raises(ValueError, match=r"renames source 'aux.weight' to 'auxiliary.weight', which is not a tensor"):
        transfer_parameters(src, dst, {**RENAME, r"^aux\.": "auxiliary."})
    with pytest.raises(ValueError, match="all map to target 'encoder.weight'"):
        transfer_parameters(src, dst, {r"^(enc|aux)\.weight": "encoder.weight"})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        transfer_parameters(src, dst, {"(": "x"})
    assert _unchanged(dst, state)


def test_bad_arguments():
    src, dst = Old(), New()
    with pytest.raises(ValueError, match="match must be one of"):
        transfer_parameters(src, dst, match="shape")
    with pytest.raises(ValueError, match="on_mismatch must be one of"):
        transfer_parameters(src, dst, on_mismatch="pad")
    with pytest.raises(ValueError, match="cannot be combined with match='order'"):
        transfer_parameters(src, dst, RENAME, match="order")
    with pytest.raises(TypeError, match="src must be"):
        transfer_parameters([1, 2], dst)
    with pytest.raises(TypeError, match="dst must be"):
        transfer_parameters(src, dst.state_dict())
    with pytest.raises(ValueError, match="meta device"):
        transfer_parameters(src, New().to("meta"))


class Reimplemented(nn.Module):
    """Old's network written differently: other names, one extra BatchNorm, a wider classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)  # not in the source
        self.out = nn.Linear(8, classes)


def test_order_matching_on_a_reimplemented_architecture():
    src = _trained(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                 nn.Linear(8, 3)))
    dst = _nan(Reimplemented())
    report = transfer_parameters(src, dst, match="order", on_mismatch="slice")
    assert _status(report) == {
        "fc1.weight": (COPIED, "0.weight"), "fc1.bias": (COPIED, "0.bias"),
        "bn1.weight": (COPIED, "1.weight"), "bn1.bias": (COPIED, "1.bias"),
        "bn1.running_mean": (COPIED, "1.running_mean"), "bn1.running_var": (COPIED, "1.running_var"),
        "bn1.num_batches_tracked": (COPIED, "1.num_batches_tracked"),
        "fc2.weight": (COPIED, "3.weight"), "fc2.bias": (COPIED, "3.bias"),
        "bn2.weight": (MISSING, None), "bn2.bias": (MISSING, None), "bn2.running_mean": (MISSING, None),
        "bn2.running_var": (MISSING, None), "bn2.num_batches_tracked": (MISSING, None),
        "out.weight": (SLICED, "5.weight"), "out.bias": (SLICED, "5.bias"),
    }
    assert report.unused == []
    assert torch.equal(dst.fc2.weight, src[3].weight) and torch.equal(dst.bn1.running_mean, src[1].running_mean)
    assert torch.equal(dst.out.weight[:3], src[5].weight)


def test_order_matching_same_layout_pairs_by_position():
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    dst = Reimplemented(classes=3)
    del dst.bn1, dst.bn2
    report = transfer_parameters(src, dst, match="order")
    # per layer: fc2's bias (8,) fits 0.bias too, but layers pair whole (weight and bias together)
    assert [e.source for e in report] == ["0.weight", "0.bias", None, None, "2.weight", "2.bias"]
    assert report.unused == [] and torch.equal(dst.fc1.bias, src[0].bias)
    assert [e.status for e in report][2:4] == [MISSING, MISSING]


def test_dtype_conversion_from_a_state_dict():
    src = Old().double()
    dst = New(classes=3)
    report = transfer_parameters(src.state_dict(), dst, RENAME)
    e = report["encoder.weight"]
    assert e.status == COPIED and "float64 -> float32" in e.detail
    assert dst.encoder.weight.dtype == torch.float32
    torch.testing.assert_close(dst.encoder.weight, src.enc.weight.float(), rtol=0, atol=0)
    assert report["norm.num_batches_tracked"].detail == ""  # int64 -> int64: no conversion


def test_tensor_objects_stay_the_same():
    src, dst = Old(), Old()
    before = [id(p) for p in dst.parameters()]
    transfer_parameters(src, dst)
    assert [id(p) for p in dst.parameters()] == before


def test_masks_travel_with_their_weights():
    src, dst = Old(), _nan(New())
    l1_unstructured(src.enc, "weight", 0.5)
    l1_unstructured(src.head, "weight", 0.5)
    report = transfer_parameters(src, dst, RENAME, on_mismatch="slice")
    assert report["encoder.weight"].mask and report["classifier.weight"].mask
    assert "weight_mask" not in " ".join(e.target for e in report)  # masks have no entries of their own
    assert "enc.weight_mask" not in report.unused
    assert pruned_names(dst.encoder) == ["weight"] and pruned_names(dst.classifier) == ["weight"]
    assert torch.equal(dst.encoder.weight_mask, src.enc.weight_mask)
    assert sparsity.get_mask(dst.encoder.weight) is dst.encoder.weight_mask  # linked under the contract
    assert torch.equal(dst.classifier.weight_mask[:3], src.head.weight_mask)
    assert dst.classifier.weight_mask[3:].all()  # the re-initialised rows are not pruned
    assert (dst.classifier.weight[~dst.classifier.weight_mask] == 0).all()
    assert (dst.encoder.weight[~dst.encoder.weight_mask] == 0).all()


def test_a_pruned_target_stays_pruned_when_the_source_is_dense():
    src, dst = Old(), Old()
    l1_unstructured(dst.enc, "weight", 0.5)
    mask = dst.enc.weight_mask.clone()
    transfer_parameters(src, dst)
    assert torch.equal(dst.enc.weight_mask, mask)
    assert (dst.enc.weight[~mask] == 0).all() and torch.equal(dst.enc.weight[mask], src.enc.weight[mask])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.emb.weight


def test_tied_weights():
    src = Tied()
    state = {"emb.weight": src.emb.weight.detach().clone()}  # checkpoints often drop the tied copy
    dst = Tied()
    report = transfer_parameters(state, dst, strict=True)
    assert report["lm_head.weight"].status == TIED and "emb.weight" in report["lm_head.weight"].detail
    assert torch.equal(dst.lm_head.weight, state["emb.weight"])
    # a tied source copy that no target takes is not 'unused': its data was used
    one = nn.Module()
    one.emb = nn.Embedding(10, 4)
    assert transfer_parameters(src, one).unused == []


@pytest.mark.gpu
def test_device_conversion():
    src, dst = Old(), New(classes=3).cuda()
    report = transfer_parameters(src, dst, RENAME)
    assert "cpu -> cuda:0" in report["encoder.weight"].detail
    assert torch.equal(dst.encoder.weight.cpu(), src.enc.weight)


def test_report_is_data():
    src, dst = Old(), New()
    report = transfer_parameters(src, copy.deepcopy(dst), RENAME, on_mismatch="slice")
    assert [e.target for e in report.by_status(MISSING)] == ["extra.weight", "extra.bias"]
    assert len(report) == len(dst.state_dict()) and repr(report).startswith("TransferReport(")
    with pytest.raises(KeyError):
        report["nope"]
    with pytest.raises(ValueError, match="status must be one of"):
        report.by_status("lost")


# ------------------------------------------------------------------ transformers models: roles, dry runs
def _hf():
    return pytest.importorskip("tests.transfer._hf")


def test_order_matching_refuses_crossing_roles():
    """Llama -> GPT-2 by order would pair GPT-2's position table with a key projection of the same shape."""
    hf = _hf()
    src = hf.build("llama", kv_heads=2, heads=4)  # k_proj [16, 32]
    dst = hf.build("gpt2")
    dst.transformer.wpe = nn.Embedding(16, 32)  # wpe [16, 32]: the same shape as k_proj
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight \(embedding\) <- "
                                         r"model\.layers\.0\.self_attn\.k_proj\.weight \(projection\)"):
        transfer_parameters(src, dst, match="order")
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())
    with pytest.warns(UserWarning, match="transformer.wpe.weight"):
        report = transfer_parameters(src, dst, match="order", on_role_mismatch="warn")
    assert report["transformer.wpe.weight"].status == COPIED
    assert torch.equal(dst.transformer.wpe.weight, src.model.layers[0].self_attn.k_proj.weight)
    with pytest.raises(ValueError, match="on_role_mismatch"):
        transfer_parameters(src, dst, match="order", on_role_mismatch="skip")


def test_role_of():
    from nnopt.transfer.parameters import role_of

    roles = {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
             "bert.embeddings.word_embeddings.weight": "embedding", "model.embed_tokens.weight": "embedding",
             "lm_head.weight": "embedding", "transformer.h.0.ln_1.weight": "norm",
             "model.layers.3.input_layernorm.weight": "norm", "bert.encoder.layer.0.output.LayerNorm.bias": "norm",
             "transformer.ln_f.weight": "norm", "transformer.h.0.attn.c_attn.weight": "projection",
             "model.layers.0.mlp.down_proj.weight": "projection",
             "bert.encoder.layer.0.attention.self.query.weight": "projection", "0.weight": "other",
             "classifier.weight": "other", "fc1.bias": "projection", "bn1.running_mean": "norm"}
    assert {k: role_of(k) for k in roles} == roles


def test_gpt2_width_transfer_by_order_and_dry_run():
    """GPT-2 into a wider GPT-2 by order with slicing: no role crossing, every tensor reported; a dry run reports
    the same and writes nothing."""
    hf = _hf()
    src, dst = hf.build("gpt2", hidden=32, ff=48), hf.build("gpt2", hidden=48, ff=64, seed=5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    dry = transfer_parameters(src, dst, match="order", on_mismatch="slice", dry_run=True)
    assert dry.dry_run and "dry run: nothing was written" in str(dry) and "dry_run=True" in repr(dry)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())
    report = transfer_parameters(src, dst, match="order", on_mismatch="slice")
    assert [(e.target, e.source, e.status) for e in report] == [(e.target, e.source, e.status) for e in dry]
    assert [e.target for e in report] == [k for k in dst.state_dict() if not k.endswith("_mask")]
    assert {e.status for e in report} <= {COPIED, SLICED, TIED} and report.counts[SLICED] > 0
    assert torch.equal(dst.transformer.h[1].mlp.c_fc.weight[:32, :48], src.transformer.h[1].mlp.c_fc.weight)
    assert dst.lm_head.weight is dst.transformer.wte.weight


def test_dry_run_by_name_raises_like_a_real_run():
    src, dst = Old(), New()
    dry = transfer_parameters(src, dst, RENAME, on_mismatch="slice", dry_run=True)
    real = transfer_parameters(src, New(), RENAME, on_mismatch="slice")
    assert [(e.target, e.status) for e in dry] == [(e.target, e.status) for e in real]
    with pytest.raises(ValueError, match="shape mismatches"):
        transfer_parameters(src, dst, RENAME, on_mismatch="error", dry_run=True)
