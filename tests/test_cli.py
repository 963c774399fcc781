"""The CLI: `info` lists every backend with its availability; bad input exits 2 with a one-line error."""

import subprocess
import sys


def nnopt(*args):
    return subprocess.run([sys.executable, "-m", "nnopt", *args], capture_output=True, text=True)


def test_info_lists_backends():
    out = nnopt("info")
    assert out.returncode == 0, out.stderr
    for name in ("triton", "cuda", "cpu", "torch"):
        assert f"  {name}" in out.stdout
    assert "torch   available" in out.stdout
    assert "auto ->" in out.stdout


def test_bad_input_exits_2_without_traceback():
    for args in (["frobnicate"], ["demo", "--device", "tpu"], ["demo", "--backends", "nope"], []):
        out = nnopt(*args)
        assert out.returncode == 2, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr


def test_demo_runs_quickly_with_chosen_backends():
    out = nnopt("demo", "--quick", "--steps", "20", "--backends", "torch")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("SGD", "Adam", "Adagrad", "RMSprop"))]
    assert len(lines) >= 5 * 3
    for line in lines:
        acc = float(line.split()[-2])
        assert 0.0 <= acc <= 1.0
