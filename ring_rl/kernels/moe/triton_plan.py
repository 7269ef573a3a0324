"""The expert plan (`ExpertPlan`: the slots sorted by expert, and the grouped GEMMs' per-tile
schedule) and its Triton kernels: a stable counting sort and the tile schedule
(`triton_experts.PLAN = "triton"`).

They replace torch.sort(stable=True) (a radix sort of 64-bit keys) and the ~20 small torch
ops of the plan with 5 launches, and give the same permutation bitwise: integers only.

    counts[b, e] = number of slots of block b (BLOCK slots) routed to expert e   (_count)
    csum         = counts.cumsum(0)      (_column_cumsum: torch's outer-dim scan over the
                   [T*k/BLOCK, E] counts takes 0.18 ms at Ring-mini shapes, this ~0.01)
    offsets      = [0, cumsum(csum[-1])]                                      (torch)
    slot s of block b, expert e -> row offsets[e] + csum[b, e] - counts[b, e]
                                   + (number of earlier slots of block b on e)  (_place)
so equal experts keep slot order, exactly like the stable sort.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

BLOCK = 128           # slots per program (the rank compare is BLOCK x BLOCK)
BLOCK_E = 128         # experts per step of the histogram
CUMSUM_ROWS = 256     # count blocks per step of the column scan (tests shrink it)
CUMSUM_COLS = 8       # experts per program of the column scan


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[b, e] = number of slots in block b with expert e."""
    b = tl.program_id(0)
    s = b * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + s, mask=s < n, other=-1).to(tl.int32)   # -1: in no bin
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        hist = tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
        tl.store(counts_ptr + b.to(tl.int64) * E + cols, hist, mask=cols < E)


@triton.jit
def _column_cumsum_kernel(counts_ptr, csum_ptr, nb, E, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """csum[:, cols] = cumsum over the blocks of counts[:, cols] (int32, exact)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < E
    carry = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for r0 in range(0, nb, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < nb)[:, None] & cmask[None, :]
        off = r.to(tl.int64)[:, None] * E + cols[None, :]
        c = tl.load(counts_ptr + off, mask=m, other=0)
        tl.store(csum_ptr + off, tl.cumsum(c, axis=0) + carry[None, :], mask=m)
        carry += tl.sum(c, axis=0)


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, csum_ptr, offs_ptr, tokens_ptr, slots_ptr, inverse_ptr,
                  n, E, K: tl.constexpr, BLOCK: tl.constexpr):
    """Sorted row of each slot of block b (see the module doc); writes the token and slot
    of each row and the inverse permutation (slot -> row)."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    s = b * BLOCK + i
    m = s < n
    e = tl.load(ids_ptr + s, mask=m, other=-1).to(tl.int32)
    # rank among the earlier slots of this block with the same expert (padding: e = -1,
    # after every real slot, so it never counts for one)
    earlier = (e[None, :] == e[:, None]) & (i[None, :] < i[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    be = b.to(tl.int64) * E + tl.maximum(e, 0)
    base = (tl.load(offs_ptr + tl.maximum(e, 0), mask=m, other=0)
            + tl.load(csum_ptr + be, mask=m, other=0) - tl.load(counts_ptr + be, mask=m, other=0))
    row = base + rank
    tl.store(tokens_ptr + row, s // K, mask=m)
    tl.store(slots_ptr + row, s, mask=m)
    tl.store(inverse_ptr + s, row, mask=m)


@triton.jit
def _tiles_kernel(offs_ptr, te_ptr, tr_ptr, count_ptr, E, bound, BM: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile t -> (expert, first row): expert e owns ceil(n_e / BM) consecutive tiles; tiles
    past the last get expert E (their row is unused). count = the tiles in use."""
    tid = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ce = tl.arange(0, BLOCK_E)
    em = ce < E
    lo = tl.load(offs_ptr + ce, mask=em, other=0)
    hi = tl.load(offs_ptr + ce + 1, mask=em, other=0)
    ntiles = (hi - lo + BM - 1) // BM
    cum = tl.cumsum(ntiles, axis=0)                   # tiles of experts 0..e
    te = tl.sum(((cum[None, :] <= tid[:, None]) & em[None, :]).to(tl.int32), axis=1)
    first = lo - (cum - ntiles) * BM                  # row of tile t = first[e] + t * BM
    row = tl.sum(tl.where(ce[None, :] == te[:, None], first[None, :], 0), axis=1) + tid * BM
    tl.store(te_ptr + tid, te, mask=tid < bound)
    tl.store(tr_ptr + tid, row, mask=tid < bound)
    if tl.program_id(0) == 0:
        tl.store(count_ptr, tl.sum(ntiles, axis=0))


def counting_sort(ids: torch.Tensor, num_experts: int):
    """(tokens, slots, inverse, offsets) int32 for ids [T, k]: the stable sort of the slots
    t*k + j by expert (see the module doc)."""
    t, k = ids.shape
    n = t * k
    flat = ids.reshape(-1)
    nb = triton.cdiv(n, BLOCK)
    dev = ids.device
    counts = torch.empty(nb, num_experts, device=dev, dtype=torch.int32)
    _count_kernel[(nb,)](flat, counts, n, num_experts, BLOCK=BLOCK, BLOCK_E=BLOCK_E,
                         num_warps=4)
    csum = torch.empty_like(counts)
    _column_cumsum_kernel[(triton.cdiv(num_experts, CUMSUM_COLS),)](
        counts, csum, nb, num_experts, BLOCK_R=CUMSUM_ROWS, BLOCK_C=CUMSUM_COLS, num_warps=4)
    offsets = torch.zeros(num_experts + 1, device=dev, dtype=torch.int32)
    torch.cumsum(csum[-1], 0, dtype=torch.int32, out=offsets[1:])
    tokens = torch.empty(n, device=dev, dtype=torch.int32)
    slots = torch.empty_like(tokens)
    inverse = torch.empty_like(tokens)
    _place_kernel[(nb,)](flat, counts, csum, offsets, tokens, slots, inverse, n, num_experts,
                         K=k, BLOCK=BLOCK, num_warps=4)
    return tokens, slots, inverse, offsets


def tile_plan(offsets: torch.Tensor, block_m: int, bound: int):
    """(tile_expert, tile_row) int32 [bound] and the count of tiles in use int32 [1] from
    offsets [E+1] (see _tiles_kernel)."""
    e = offsets.numel() - 1
    te = torch.empty(bound, device=offsets.device, dtype=torch.int32)
    tr = torch.empty_like(te)
    count = torch.empty(1, device=offsets.device, dtype=torch.int32)
    block_e = triton.next_power_of_2(e)
    block_t = max(16, 8192 // block_e)
    _tiles_kernel[(triton.cdiv(bound, block_t),)](offsets, te, tr, count, e, bound, BM=block_m,
                                                  BLOCK_E=block_e, BLOCK_T=block_t,
                                                  num_warps=4)
    return te, tr, count


@dataclass
class ExpertPlan:
    """The slot permutation of one routing: sorted rows -> token, slot; expert offsets."""
    num_tokens: int
    top_k: int
    num_experts: int
    tokens: torch.Tensor          # int32 [N]: token of each sorted row
    slots: torch.Tensor           # int32 [N]: slot (t*k + j) of each sorted row
    offsets: torch.Tensor         # int32 [E+1]
    method: str = "torch"         # how tiles() is computed ("torch" or "triton")
    _inverse: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def inverse(self) -> torch.Tensor:
        """int32 [N]: the sorted row of each slot (slot order -> sorted order)."""
        if self._inverse is None:
            inv = torch.empty_like(self.slots)
            inv[self.slots.long()] = torch.arange(self.num_rows, device=inv.device,
                                                  dtype=inv.dtype)
            self._inverse = inv
        return self._inverse

    @property
    def ends(self) -> torch.Tensor:
        """int32 [E]: offsets[1:], torch._grouped_mm's `offs` (end row of each expert)."""
        if "ends" not in self._cache:
            self._cache["ends"] = self.offsets[1:].contiguous()
        return self._cache["ends"]

    @property
    def by_load(self) -> torch.Tensor:
        """int32 [E]: experts, most rows first (the Triton weight-gradient order)."""
        if "by_load" not in self._cache:
            counts = self.offsets[1:] - self.offsets[:-1]
            self._cache["by_load"] = torch.sort(counts, descending=True,
                                                stable=True).indices.int()
        return self._cache["by_load"]

    def tiles(self, block_m: int):
        """(tile_expert, tile_row) int32 [bound]: expert and first row of each BLOCK_M tile;
        tiles past the last hold expert E (the program exits). bound needs no host sync."""
        return self._tile_plan(block_m)[:2]

    def tile_count(self, block_m: int) -> torch.Tensor:
        """int32 [1] on the device: the BLOCK_M tiles in use (the persistent kernels' loop)."""
        return self._tile_plan(block_m)[2]

    def _tile_plan(self, block_m: int):
        key = ("tiles", block_m)
        if key not in self._cache:
            e = self.num_experts
            bound = triton.cdiv(self.num_rows, block_m) + e
            if self.method == "triton":
                self._cache[key] = tile_plan(self.offsets, block_m, bound)
            else:
                off = self.offsets.long()
                ntiles = (off[1:] - off[:-1] + block_m - 1) // block_m
                cum = ntiles.cumsum(0)
                tid = torch.arange(bound, device=off.device)
                te = torch.searchsorted(cum, tid, right=True)
                tc = te.clamp(max=e - 1)
                row = off[tc] + (tid - (cum - ntiles)[tc]) * block_m
                self._cache[key] = (te.int(), row.int(), cum[-1:].int())
        return self._cache[key]
