"""``report(model)``: how sparse each layer is, as data (a list of dicts) and as a printable table.

One row per parameter of each module that has parameters: ``layer`` (the module's qualified name), ``param``,
``shape``, ``params`` (entries), ``nonzeros``, ``sparsity`` (fraction of entries exactly 0), ``block_sparsity``
(fraction of ``block`` tiles, default 32×32, of the tensor viewed as ``(shape[0], -1)`` that are entirely 0;
edge tiles are smaller; None for tensors with fewer than 2 dimensions) and ``masked`` (whether it carries a
``<name>_mask`` buffer). A transformers ``Conv1D`` weight (stored ``[in, out]``) is tiled in its ``[out, in]`` view,
as an ``nn.Linear``'s, so block sparsity means the same thing for both. ``Report.total`` sums the whole model.
"""

import torch

from nnopt.layers import is_conv1d
from nnopt.prune._contract import MASK_SUFFIX
from nnopt.prune.structured import block_sums

COLUMNS = ("layer", "param", "shape", "params", "nonzeros", "sparsity", "block_sparsity", "masked")


class Report(list):
    """The rows of ``report``; ``str()`` formats them as a table with a total line."""

    def __init__(self, rows, block):
        super().__init__(rows)
        self.block = block
        params = sum(r["params"] for r in rows)
        nonzeros = sum(r["nonzeros"] for r in rows)
        self.total = {"params": params, "nonzeros": nonzeros,
                      "sparsity": 1.0 - nonzeros / params if params else 0.0}

    def __str__(self):
        def fmt(r):
            bs = "-" if r["block_sparsity"] is None else f"{r['block_sparsity']:.2%}"
            return [r["layer"] or "(root)", r["param"], "x".join(map(str, r["shape"])) or "()", str(r["params"]),
                    str(r["nonzeros"]), f"{r['sparsity']:.2%}", bs, "yes" if r["masked"] else ""]

        head = ["layer", "param", "shape", "params", "nonzeros", "sparsity",
                f"{self.block[0]}x{self.block[1]} blocks", "masked"]
        t = self.total
        body = [fmt(r) for r in self] + [["total", "", "", str(t["params"]), str(t["nonzeros"]),
                                          f"{t['sparsity']:.2%}", "", ""]]
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        left = {0, 1, 2}

        def line(row):
            cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            return "  ".join(cells).rstrip()

        rule = "-" * sum(widths + [2 * (len(widths) - 1)])
        return "\n".join([line(head), rule] + [line(r) for r in body[:-1]] + [rule, line(body[-1])])


@torch.no_grad()
def report(model, block=(32, 32)):
    """Per-layer sparsity of ``model``: a ``Report`` (list of dicts, printable)."""
    rows = []
    for layer, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            params = p.numel()
            nonzeros = int(torch.count_nonzero(p))
            bsp = None
            if p.dim() >= 2 and params:
                tiles = block_sums(p.t() if name == "weight" and is_conv1d(module) else p, block)
                bsp = float((tiles == 0).sum()) / tiles.numel()
            rows.append({"layer": layer, "param": name, "shape": tuple(p.shape), "params": params,
                         "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / params if params else 0.0,
                         "block_sparsity": bsp, "masked": name + MASK_SUFFIX in module._buffers})
    return Report(rows, tuple(block))
