"""The block layout of a mask: which block_n × block_k tiles hold any entry, in the orders the kernels walk.

Built once per mask (and cached by MaskedLinear until the mask changes): a few small int32 tensors on the
mask's device. The kernels read them; nothing here is per step.
"""

import torch


class BlockLayout:
    """Non-empty tiles of a bool mask [N, K] cut into block_n × block_k tiles (edge tiles clipped).

    Attributes (int32 unless said):
      shape            (N, K); ``block_n``, ``block_k``; ``nnzb`` the number of non-empty tiles.
      row_ptr [NB+1], col_idx [nnzb]   CSR over block rows: tile (j, col_idx[p]) for p in row_ptr[j]:row_ptr[j+1],
                                       block columns ascending. Forward and dW walk this order.
      col_ptr [KB+1], row_idx [nnzb]   CSC over block columns, block rows ascending; dx walks this order.
      t_perm [nnzb]                    CSR index of each CSC entry.
      full [nnzb] (bool, CSR order)    the tile is entirely true: kernels skip the mask load.
      density                          fraction of true entries; ``block_density`` = nnzb / (NB * KB).
      is_2_4                           at most 2 true entries in every aligned group of 4 along K.
    """

    def __init__(self, mask, block_n=32, block_k=32):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError("BlockLayout: mask must be a 2-D bool tensor [out_features, in_features]")
        if block_n < 1 or block_k < 1:
            raise ValueError(f"BlockLayout: block sizes must be positive, got {block_n}x{block_k}")
        n, k = mask.shape
        nb, kb = -(-n // block_n), -(-k // block_k)
        tiled = mask.contiguous()
        if n % block_n or k % block_k:  # pad to whole tiles (with False) so one view reduces every tile
            tiled = torch.zeros(nb * block_n, kb * block_k, dtype=torch.bool, device=mask.device)
            tiled[:n, :k] = mask
        counts = tiled.view(nb, block_n, kb, block_k).sum(dim=(1, 3), dtype=torch.int32)  # true entries per tile
        tile_rows = torch.full((nb,), block_n, device=mask.device)
        tile_cols = torch.full((kb,), block_k, device=mask.device)
        if nb and kb:  # edge tiles are clipped to the matrix (a 0-sized side has no tiles at all)
            tile_rows[-1] = n - (nb - 1) * block_n
            tile_cols[-1] = k - (kb - 1) * block_k
        capacity = tile_rows[:, None] * tile_cols[None, :]
        nonempty = counts > 0
        r, c = nonempty.nonzero(as_tuple=True)  # row-major: CSR order
        self.shape = (n, k)
        self.block_n, self.block_k = int(block_n), int(block_k)
        self.device = mask.device
        self.nnzb = int(r.numel())
        i32 = dict(dtype=torch.int32, device=mask.device)
        self.row_ptr = torch.zeros(nb + 1, **i32)
        self.row_ptr[1:] = nonempty.sum(1).cumsum(0)
        self.col_idx = c.to(torch.int32)
        self.full = (counts == capacity)[r, c]
        order = torch.argsort(c * nb + r)  # CSC order, rows ascending within a column
        self.t_perm = order.to(torch.int32)
        self.row_idx = r[order].to(torch.int32)
        self.col_ptr = torch.zeros(kb + 1, **i32)
        self.col_ptr[1:] = nonempty.sum(0).cumsum(0)
        self.density = float(counts.sum()) / max(1, n * k)
        self.block_density = self.nnzb / max(1, nb * kb)
        # 2:4 semi-structured: at most 2 kept entries in every aligned group of 4 along K (GPU sparse tensor cores)
        self.is_2_4 = k % 4 == 0 and bool((mask.reshape(n, k // 4, 4).sum(-1, dtype=torch.int8) <= 2).all())

    def tensors(self):
        """The layout tensors in the order of the registered ops' arguments (see csrc/ops.cpp)."""
        return dict(row_ptr=self.row_ptr, col_idx=self.col_idx, full=self.full, col_ptr=self.col_ptr,
                    row_idx=self.row_idx, t_perm=self.t_perm)

    def __repr__(self):
        n, k = self.shape
        return (f"BlockLayout({n}x{k}, blocks {self.block_n}x{self.block_k}, {self.nnzb} non-empty tiles, "
                f"density {self.density:.3f})")
