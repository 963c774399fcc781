"""nnopt.demo.text (byte corpus from the stdlib or a user's text) and nnopt.demo.lm (small transformers LMs)."""

import math

import pytest
import torch

from nnopt.demo import text


def test_stdlib_corpus_is_deterministic_and_split():
    a, b = text.corpus(max_bytes=200_000), text.corpus(max_bytes=200_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.train.numel() > 0 and a.heldout.numel() > 0 and a.train.numel() + a.heldout.numel() <= 200_000
    x = a.batch("train", 3, 17, torch.Generator().manual_seed(0))
    assert x.shape == (3, 17) and x.dtype == torch.int64 and int(x.max()) < text.VOCAB
    assert a.windows("heldout", 32, 5).shape == (5, 32)


def test_user_text_and_bad_sources(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world, " * 200)
    c = text.corpus(str(f))
    assert c.train.numel() + c.heldout.numel() == 2600
    (tmp_path / "empty").mkdir()
    with pytest.raises(text.TextError, match="holds no files"):
        text.corpus(str(tmp_path / "empty"))
    (tmp_path / "bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(text.TextError, match="binary"):
        text.corpus(str(tmp_path / "bin"))
    with pytest.raises(text.TextError, match="no such file"):
        text.corpus(str(tmp_path / "missing"))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(text.TextError, match="shorter than one sequence"):
        text.corpus(str(tmp_path / "short.txt")).batch("train", 1, 64)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_lm_trains_and_evaluates(kind):
    lm = pytest.importorskip("nnopt.demo.lm")
    pytest.importorskip("transformers")
    c = text.corpus(max_bytes=100_000)
    model = lm.build(kind, d_model=32, n_layers=1, n_heads=2, seq_len=32, n_kv_heads=1 if kind == "llama" else None)
    losses = lm.train(model, c, torch.optim.AdamW(model.parameters(), lr=1e-2), 3, batch_size=4, seq_len=32)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    ce, ppl = lm.evaluate(model, c.windows("heldout", 32, 6), batch_size=4)
    assert math.isfinite(ce) and ppl == pytest.approx(math.exp(ce))
    with pytest.raises(ValueError, match="kind must be one of"):
        lm.build("bert")
