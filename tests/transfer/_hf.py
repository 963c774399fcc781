"""Tiny randomly initialised ``transformers`` models of the three block layouts the transfer tests cover:
GPT-2 (Conv1D, fused q/k/v, tied embeddings), BERT (Linear, post-norm, MLP split over two modules) and Llama
(gated MLP, grouped-query attention)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 61
ARCHS = ("gpt2", "bert", "llama")
REL = 1e-5  # the bar: logits change by at most 1e-5 relative (max |diff| / max |logit|)


def build(kind, hidden=32, layers=2, heads=4, kv_heads=2, ff=48, seed=0, perturb=True):
    """A model in eval mode (dropout off), fp32; ``perturb``: every 1-D parameter (norm scales and shifts, biases)
    moved by N(0, 0.1^2), so norms are not the identity and zero biases do not hide mistakes."""
    t = transformers
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ff,
                           bos_token_id=0, eos_token_id=0)
        cls = t.GPT2LMHeadModel
    elif kind == "bert":
        cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=ff, max_position_embeddings=32, pad_token_id=0)
        cls = t.BertForMaskedLM
    elif kind == "llama":
        cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, intermediate_size=ff, max_position_embeddings=32,
                            pad_token_id=0, bos_token_id=0, eos_token_id=0)
        cls = t.LlamaForCausalLM
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if perturb and p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ids(batch=2, seq=9, seed=1):
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))}


def logits(model, x=None, **kw):
    """The model's logits on ``x`` (default ``ids()``), without autograd."""
    with torch.no_grad():
        return model(**(x or ids()), **kw).logits


def rel_change(a, b):
    """max |a - b| / max |a|: the issue's relative measure of a change of logits."""
    return float((a - b).abs().max() / a.abs().max())


def snapshot(model):
    """Copies of the state_dict and the config, for ``assert_untouched``."""
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def assert_untouched(model, snap):
    """The model's tensors and config equal the snapshot (an operator returned a new model, or refused)."""
    state, config = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert model.config.to_dict() == config
