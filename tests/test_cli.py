"""The CLI end to end: `info`, `demo --quick` (report contents, plots), `bench --quick`, and bad input (exit 2,
one line, no traceback)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def nnopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nnopt", *args], capture_output=True, text=True, cwd=cwd)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def test_info_lists_backends():
    out = nnopt("info")
    assert out.returncode == 0, out.stderr
    for name in ("triton", "cuda", "cpu", "torch"):
        assert f"  {name}" in out.stdout
    assert "torch   available" in out.stdout
    assert "auto ->" in out.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(50), y=np.zeros(50, dtype=np.int64))  # x must be N × features
    a_file = tmp_path / "file"
    a_file.write_text("")
    truncated = tmp_path / "train-images-idx3-ubyte"
    truncated.write_bytes(b"\x00\x00\x08\x03\x00")
    cases = [["frobnicate"], [], ["demo", "--device", "tpu"], ["demo", "--data", str(tmp_path / "missing.npz")],
             ["demo", "--data", str(bad)], ["demo", "--out", str(a_file / "sub")], ["demo", "--backend", "nope"],
             ["demo", "--data", str(truncated)], ["demo", "--steps", "0"], ["bench", "nope"],
             ["bench", "optim", "--json", str(tmp_path / "no" / "dir" / "x.json")]]
    (tmp_path / "empty").mkdir()
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "short.txt").write_text("print('hello')\n" * 3)
    cases += [["demo", "lm", "--data", str(tmp_path / "empty")], ["demo", "lm", "--data", str(tmp_path / "blob.bin")],
              ["demo", "lm", "--data", str(tmp_path / "short.txt")], ["demo", "lm", "--out", str(a_file / "sub")],
              ["demo", "--text", str(tmp_path / "empty")], ["demo", "poem"]]
    for args in cases:
        out = nnopt(*args)
        assert out.returncode == 2, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr, args
        assert len(out.stderr.strip().splitlines()) <= 1 or args == [], (args, out.stderr)


def test_demo_quick_end_to_end(tmp_path):
    out = nnopt("demo", "digits", "--quick", "--no-progress", "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"report: {tmp_path / 'report' / 'report.md'}" in out.stdout
    res = json.loads((tmp_path / "report" / "results.json").read_text())
    accs = [r["accuracy"] for r in res["optimizers"]] + [r["accuracy"] for r in res["prune"]["rows"]]
    accs += [res["distill"][k] for k in ("teacher", "labels_only", "distilled")]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert max(r["accuracy"] for r in res["optimizers"]) > 0.9  # the digits are easy: training worked
    sparsities = sorted({round(r["sparsity"], 3) for r in res["prune"]["rows"] if "fine-tune" in r["method"]})
    assert sparsities == [0.9, 0.95]
    assert {r["optimizer"] for r in res["optimizers"]} >= {"SGD", "SGD+momentum", "Adam"}
    assert res["transfer"]["widen_deviation"] < 1e-4  # function-preserving growth
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in res["speed"]["rows"])
    assert len(res["plots"]) == 3 and all(is_png(tmp_path / "report" / p) for p in res["plots"])
    md = (tmp_path / "report" / "report.md").read_text()
    for section in ("Optimizers", "Transfer", "Pruning", "Distillation", "Inference speed"):
        assert section in md


def test_demo_lm_quick_end_to_end(tmp_path):
    """The LM story on the stdlib's sources: every stage reports, perplexities are finite and ordered, the
    sparsities are the ones asked for, tokens/s are there, every plot is a PNG."""
    out = nnopt("demo", "lm", "--quick", "--no-progress", "--out", str(tmp_path / "lm"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"report: {tmp_path / 'lm' / 'report.md'}" in out.stdout
    res = json.loads((tmp_path / "lm" / "results.json").read_text())
    rows = {r["optimizer"]: r for r in res["train"]}
    assert set(rows) == {"torch.optim.AdamW", "nnopt AdamW", "nnopt AdamW8bit"}
    assert rows["nnopt AdamW8bit"]["state_bytes_per_param"] < 0.5 * rows["nnopt AdamW"]["state_bytes_per_param"]
    grow = res["grow"]
    assert grow["relative_deviation"] < 1e-4  # function-preserving growth (a little noise breaks the symmetry)
    grown, scratch = grow["rows"]
    assert grown["params"] == scratch["params"] and grown["curve"][0][1] < scratch["curve"][0][1]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in res["train"] + res["prune"])
    dense = next(r["perplexity"] for r in res["prune"] if r["method"] == "dense")
    for r in res["prune"]:
        want = {"50%": 0.5, "2:4": 0.5, "90% 32×32 blocks": 0.9, "-": 0.0}[r["pattern"]]
        # blocks: a layer's block count times 0.9 is rounded to whole blocks, so small layers land a little below
        assert abs(r["sparsity"] - want) < (0.02 if want == 0.9 else 1e-3), r
        assert r["perplexity"] >= dense * (0.98 if want < 0.9 else 1.0), r  # pruning never helps much
    rec = res["recover"]
    assert rec["sparsity_after"] >= 0.89 and max(rec["fine_tuned"], rec["distilled"]) < rec["before"]
    speeds = [r for r in res["serve"]["rows"] if r["model"] == "sparse"]
    assert len(speeds) == 6 and all(r.get("decode_speedup", r.get("prefill_speedup", 0)) > 0 for r in speeds)
    assert set(res["serve"]["samples"]) == {"dense", "sparse"}
    assert len(res["plots"]) == 3 and all(is_png(tmp_path / "lm" / p) for p in res["plots"])
    md = (tmp_path / "lm" / "report.md").read_text()
    for section in ("Training", "Growth", "pruning", "Recovering", "Serving", "Samples"):
        assert section in md


def test_demo_reads_a_users_npz(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "mine.npz", x=d.images, y=d.target)  # N × 8 × 8 images, flattened by the demo
    out = nnopt("demo", "digits", "--quick", "--steps", "20", "--no-progress", "--data", str(tmp_path / "mine.npz"),
                "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["data"] == "mine.npz"


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path):
    out = nnopt("bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "b.json"), "--plot",
                str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    assert set(res) == {"optim", "masked-linear", "prune", "compact", "distill"}
    assert all(res[k] for k in res)
    assert is_png(tmp_path / "b.png")
