"""Small byte-level causal language models from ``transformers`` configs, and the loops every LM experiment shares.

``build("gpt2" | "llama", ...)`` makes a randomly initialised model (vocabulary 256, no download);
``train`` runs a plain training loop on a Corpus and returns the loss per step; ``evaluate`` gives the mean token
cross-entropy (and its exp, the perplexity) on fixed held-out windows. Used by the LM demo, benchmarks and tests.
"""

import math

import torch

from nnopt.demo.text import VOCAB

__all__ = ["build", "train", "evaluate", "KINDS"]

KINDS = ("gpt2", "llama")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("nnopt.demo.lm needs transformers: pip install transformers (then re-pin torch)") from e
    return transformers


def build(kind="gpt2", d_model=128, n_layers=2, n_heads=4, d_ff=None, seq_len=128, n_kv_heads=None, seed=0):
    """A causal LM over bytes. ``kind``: "gpt2" (Conv1D projections, LayerNorm, GELU MLP, tied embeddings) or
    "llama" (Linear projections, RMSNorm, SiLU-gated MLP, grouped-query attention with ``n_kv_heads``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    t = _transformers()
    d_ff = d_ff or 4 * d_model
    if kind == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_positions=seq_len, n_embd=d_model, n_layer=n_layers,
                              n_head=n_heads, n_inner=d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              bos_token_id=0, eos_token_id=0)
        cls = t.GPT2LMHeadModel
    else:
        config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=d_model, intermediate_size=d_ff,
                               num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=seq_len,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = t.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def train(model, corpus, optimizer, steps, batch_size=16, seq_len=128, seed=0, callback=None):
    """``steps`` optimizer steps on random training windows (seeded: same seed, same batches). Returns the list of
    training losses. ``callback(step, loss)`` is called after each step (progress bars)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in range(steps):
        ids = corpus.batch("train", batch_size, seq_len, gen).to(device)
        loss = _loss(model, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    return losses


@torch.no_grad()
def evaluate(model, windows, batch_size=16):
    """``(mean token cross-entropy, perplexity)`` of ``model`` on ``windows`` [N, T] (int64 byte ids)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(device)
        n = ids.numel() - ids.shape[0]  # predicted tokens: every position but the first
        total += float(_loss(model, ids)) * n
        count += n
    model.train(was)
    ce = total / count
    return ce, math.exp(ce)
