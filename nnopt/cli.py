"""The nnopt command line: `nnopt info`, `nnopt demo` and `nnopt bench` (also `python -m nnopt ...`).

Bad input gives a one-line error and exit code 2, never a traceback.
"""

import argparse
import platform
import sys


def _info(args):
    import torch

    from nnopt import __version__, backends

    print(f"nnopt {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    if cuda:
        print(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name(0)}")
    else:
        print("cuda: no device visible to torch")
    for device in devices + ([] if cuda else ["cuda"]):
        print(f"\nbackends for {device} tensors:")
        for name, why in backends.availability(device):
            print(f"  {name:7s} {'available' if why is None else 'missing: ' + why}")
        if device in devices:
            print(f"  auto -> {backends.resolve('fused_optim', 'auto', device)}")
            for family in backends.AUTO_ORDER:
                if family == "fused_optim":
                    continue
                rows = [f"{b}: {'yes' if why is None else 'no'}" for b, why in
                        backends.availability(device, family) if b != "torch"]
                print(f"  {family:14s} auto -> {backends.resolve(family, 'auto', device):6s} ({', '.join(rows)})")
    return 0


def _demo(args):
    from nnopt.demo import run

    return run(args.story, quick=args.quick, device=args.device, data=args.data, text=args.text, out=args.out,
               backend=args.backend, steps=args.steps, progress=not args.no_progress)


def _bench(args):
    from nnopt.benchmarks import run

    return run(args.which, device=args.device, quick=args.quick, json_path=args.json, plot_path=args.plot)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"nnopt: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None):
    parser = _Parser(prog="nnopt", description="nnopt: fused optimizers and sparsity tools for PyTorch")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("info", help="versions, devices and each backend's availability").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="the whole story on an MLP over digits, then on a byte-level language model")
    demo.add_argument("story", nargs="?", default="all", choices=["all", "digits", "lm"],
                      help="digits, lm, or all (default: both, digits first)")
    demo.add_argument("--quick", action="store_true", help="a short run (about a minute and a half on 2 CPU cores)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--data", default=None, help="digits: a .npz (arrays x, y) or IDX files such as MNIST (default: "
                      "scikit-learn's digits); lm: a text file or folder (default: the standard library's sources)")
    demo.add_argument("--text", default=None, help="the LM story's text file or folder when both stories run")
    demo.add_argument("--out", default="nnopt-report", help="report folder (default: ./nnopt-report; with both "
                      "stories the LM's report goes to its lm/ subfolder)")
    demo.add_argument("--backend", default="auto", help="nnopt backend for the optimizers (default: auto)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    from nnopt.benchmarks import BENCHES

    bench = sub.add_parser("bench", help="run the microbenchmarks (ratios vs torch and the measured floor)")
    bench.add_argument("which", nargs="?", default="all", choices=list(BENCHES) + ["all"])
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    bench.add_argument("--json", default=None, help="write the result rows to this JSON file")
    bench.add_argument("--plot", default=None, help="write a PNG of the speedups to this file")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        print(f"nnopt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
