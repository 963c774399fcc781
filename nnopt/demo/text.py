"""Byte-level text for language-model experiments, from text every Python ships: its standard library's sources.

``corpus()`` reads the ``.py`` files under ``sysconfig``'s stdlib path (or a user's file or folder), in sorted
order so every machine with the same Python gets the same bytes, and splits them into a training part and a
held-out part (the last ``heldout`` fraction, whole files on either side). Bytes are tokens: vocabulary 256.
"""

import os
import sysconfig

import torch

__all__ = ["TextError", "Corpus", "corpus", "stdlib_files"]

VOCAB = 256


class TextError(ValueError):
    """The text source is unusable; the message says why in one line."""


def stdlib_files():
    """The standard library's ``.py`` files (site-packages and test suites excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return found


def _user_files(path):
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
        if not files:
            raise TextError(f"--data {path}: the folder holds no files")
        return files
    if os.path.isfile(path):
        return [path]
    raise TextError(f"--data {path}: no such file or folder")


def _is_text(raw):
    if b"\0" in raw[:4096]:
        return False
    try:
        raw[:4096].decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > 4090  # a multi-byte character cut at the window's end
    return True


class Corpus:
    """``train`` and ``heldout``: uint8 tensors of bytes. ``source`` says where they came from."""

    def __init__(self, train, heldout, source):
        self.train, self.heldout, self.source = train, heldout, source

    def split(self, name):
        if name not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {name!r}")
        return self.train if name == "train" else self.heldout

    def batch(self, split, batch_size, seq_len, generator=None):
        """Random windows: ``[batch_size, seq_len]`` int64 byte ids (the model shifts labels itself)."""
        data = self.split(split)
        if data.numel() <= seq_len:
            raise TextError(f"the {split} text ({data.numel()} bytes) is shorter than one sequence ({seq_len + 1})")
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
        return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()

    def windows(self, split, seq_len, count):
        """``count`` evenly spaced, non-overlapping where possible windows ``[count, seq_len]``: a fixed
        evaluation set."""
        data = self.split(split)
        if data.numel() < seq_len:
            raise TextError(f"the {split} text ({data.numel()} bytes) is shorter than one sequence ({seq_len})")
        last = data.numel() - seq_len
        starts = torch.linspace(0, last, count).long()
        return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def corpus(path=None, max_bytes=4_000_000, heldout=0.1):
    """A byte corpus of at most ``max_bytes`` bytes from ``path`` (a text file or folder) or, by default, the
    standard library's sources. Raises TextError for an empty folder, a binary file, or no text at all."""
    files = _user_files(path) if path is not None else stdlib_files()
    chunks, total, skipped = [], 0, []
    for f in files:
        try:
            with open(f, "rb") as fh:
                raw = fh.read(max_bytes - total)
        except OSError as e:
            raise TextError(f"{f}: cannot read ({e.strerror})") from None
        if not _is_text(raw):
            skipped.append(f)
            continue
        chunks.append(raw)
        total += len(raw)
        if total >= max_bytes:
            break
    if not chunks:
        what = "binary" if skipped else "empty"
        raise TextError(f"{path or 'the standard library'}: no text to train on ({what} input)")
    cut = max(1, int(len(chunks) * (1 - heldout))) if len(chunks) > 1 else None
    if cut is None or cut >= len(chunks):  # one file: split its bytes
        raw = b"".join(chunks)
        n = int(len(raw) * (1 - heldout))
        train, held = raw[:n], raw[n:]
    else:
        train, held = b"".join(chunks[:cut]), b"".join(chunks[cut:])
    source = path if path is not None else f"stdlib sources ({sysconfig.get_paths()['stdlib']})"
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)
    return Corpus(as_tensor(train), as_tensor(held), source)
