"""``TransferReport``: what ``transfer_parameters`` did to every target tensor, as data and as a printable table.

One ``TransferEntry`` per tensor of the target's ``state_dict`` (mask buffers ``<name>_mask`` travel with their
tensor and have no entry of their own), in the target's order:

- ``copied``: the whole source tensor was copied (converted to the target's dtype and device);
- ``sliced``: shapes differ; the overlapping block ``detail`` names was copied, the rest (if any) re-initialised;
- ``reinitialised``: shapes differ and ``on_mismatch="skip"``; ``detail`` names the initialiser used;
- ``missing``: no source tensor; the target keeps its values (or is re-initialised with ``reinit_missing=True``);
- ``tied``: no source tensor of its own, but it is the same tensor as another target that received data.

``unused`` lists the source tensors no target took, in the source's order; ``dry_run`` is True for a report of
what would happen (nothing written).
"""

import dataclasses

COPIED, SLICED, REINITIALISED, MISSING, TIED = "copied", "sliced", "reinitialised", "missing", "tied"
STATUSES = (COPIED, SLICED, REINITIALISED, MISSING, TIED)

__all__ = ["COPIED", "MISSING", "REINITIALISED", "SLICED", "STATUSES", "TIED", "TransferEntry", "TransferReport"]


def _shape(shape):
    return "x".join(map(str, shape)) if shape is not None and len(shape) else ("()" if shape is not None else "-")


@dataclasses.dataclass
class TransferEntry:
    """One target tensor: its name and shape, the source tensor paired with it (None when missing), the status
    (one of ``STATUSES``) and a human-readable ``detail`` (the slice copied, the initialiser used, conversions)."""

    target: str
    source: str | None
    status: str
    detail: str = ""
    target_shape: tuple = ()
    source_shape: tuple | None = None
    mask: bool = False  # a source mask came along (nnopt.prune's contract)


class TransferReport:
    """The outcome of ``transfer_parameters``: ``entries`` (list of ``TransferEntry``), ``unused`` (source names),
    ``counts`` (status -> number of entries); ``str()`` formats it as a table."""

    def __init__(self, entries, unused, match="name", on_mismatch="skip", dry_run=False):
        self.entries = list(entries)
        self.dry_run = dry_run
        self.unused = list(unused)
        self.match = match
        self.on_mismatch = on_mismatch

    @property
    def counts(self):
        """``{status: number of entries}`` for every status, zeros included."""
        counts = dict.fromkeys(STATUSES, 0)
        for e in self.entries:
            counts[e.status] += 1
        return counts

    def by_status(self, status):
        """The entries with ``status``."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        return [e for e in self.entries if e.status == status]

    def __getitem__(self, target):
        """The entry of the target tensor named ``target``."""
        for e in self.entries:
            if e.target == target:
                return e
        raise KeyError(target)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    @property
    def complete(self):
        """True when every target was copied whole (or is tied to one that was) and every source was used."""
        return not self.unused and all(e.status in (COPIED, TIED) for e in self.entries)

    def __repr__(self):
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        dry = ", dry_run=True" if self.dry_run else ""
        return f"TransferReport({counts}, unused={len(self.unused)}{dry})"

    def __str__(self):
        head = ["target", "shape", "status", "source", "source shape", "detail"]
        body = [[e.target, _shape(e.target_shape), e.status, e.source or "-",
                 _shape(e.source_shape) if e.source is not None else "-",
                 "; ".join(filter(None, [e.detail, "mask transferred" if e.mask else ""]))] for e in self.entries]
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]

        def line(row):
            return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        dry = "; dry run: nothing was written" if self.dry_run else ""
        lines = [f"transfer (match={self.match}, on_mismatch={self.on_mismatch}{dry})", line(head), rule]
        lines += [line(r) for r in body]
        lines.append(rule)
        lines.append(", ".join(f"{v} {k}" for k, v in self.counts.items()) + f", {len(self.unused)} unused")
        if self.unused:
            lines.append("unused source tensors: " + ", ".join(self.unused))
        return "\n".join(lines)
