"""``nnopt demo``: the whole story, twice — on an MLP over digits, then on a byte-level language model.

``run(story="all" | "digits" | "lm", ...)``. The digits story (``digits.py``) trains, transfers, prunes, distils and
times an MLP on scikit-learn's bundled digits (or ``--data``: .npz or IDX files). The LM story (``lm_story.py``)
trains a small causal transformer on the standard library's sources (or ``--data``/``--text``: a text file or
folder), grows, prunes one-shot, recovers and serves it. Each prints progress and a summary, and writes a report
folder (report.md, results.json, PNG plots): with both stories, the digits report in ``out`` and the LM's in
``out/lm``; with one, in ``out``.
"""

import os

import torch

from nnopt import backends

STORIES = ("all", "digits", "lm")


def _check(device, backend, out, steps):
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be a positive number of training steps, got {steps}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if backend != "auto":
        why = backends.missing(backend, device) if backend in backends.BACKENDS else f"unknown backend {backend!r}"
        if why is not None:
            raise ValueError(f"--backend {backend}: {why}")
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise OSError(f"--out {out}: not a writable folder ({e.strerror or e})") from None
    return device, out


def run(story="all", quick=False, device=None, data=None, text=None, out="nnopt-report", backend="auto",
        steps=None, progress=True):
    """Runs the chosen story (or both, digits first). ``data``: the digits story's data, or the LM story's text
    when only that story runs; ``text``: the LM story's text. Returns 0."""
    if story not in STORIES:
        raise ValueError(f"story must be one of {', '.join(STORIES)}, got {story!r}")
    device, out = _check(device, backend, out, steps)
    if story == "lm" and text is None:
        text, data = data, None
    corpus = None
    if story in ("all", "lm"):  # the text is checked before any story runs
        from nnopt.demo import lm_story

        corpus = lm_story.load_text(text, quick, device)
    if story in ("all", "digits"):
        from nnopt.demo import digits

        digits.run(quick, device, data, out, backend, steps, progress)
    if story in ("all", "lm"):
        lm_out = os.path.join(out, "lm") if story == "all" else out
        if story == "all":
            print()
        lm_story.run(quick, device, corpus, lm_out, backend, steps, progress)
    return 0
