"""Blocked all-pairs L2 scan of one set of hidden states, with bounded memory and exact minima.

For N states (N, d) there are N(N-1)/2 pairs. They are visited tile by tile (rows r0:r1
against columns c0:c1 >= r0), each tile's squared distances screened with one matrix multiply
through the expanded norm ||a||^2 + ||b||^2 - 2 a.b (in fp32, on states centred by their mean).
That identity loses precision for close pairs, so every pair that could be among the k closest,
under the threshold or under the floor, given a rigorous bound on the GEMM rounding error, is
recomputed exactly in fp64 from the original states. Reported minima, closest pairs and
collision counts are therefore exact.

The threshold is absolute (the paper's 1e-6). The floor is relative: pairs closer than
floor * max(||a||, ||b||) differ by no more than rounding noise of the run (near-collisions:
as far as this precision can tell, equal in exact arithmetic). The distance distribution (a
log-scale histogram of screened values, optionally of every s-th row) is approximate;
per-group minima (e.g. by prompt length) are again recomputed exactly.

The scan state (`PairScan.acc`) is plain tensors and numbers: it goes into a checkpoint after
any block row and a resumed scan gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sipit.errors import SipitError

# Histogram of squared distances by float bit pattern: (bits >> SHIFT) keeps the exponent and
# 5 mantissa bits: 32 bins per octave of d^2 (0.8% to 1.6% wide in d); 8192 bins cover all floats.
SHIFT = 18
NBINS = 1 << (31 - SHIFT)
INF_BIN = 0x7F800000 >> SHIFT  # where +inf (masked entries) lands
PERCENTILES = (0.001, 0.01, 0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
U32 = 2.0**-24  # fp32 unit roundoff
MAX_LISTED = 100  # collisions listed in full (all are counted)
EXACT_CHUNK = 1 << 18  # candidate pairs recomputed at once


def bin_edges() -> np.ndarray:
    """Lower edge in d^2 of every histogram bin, plus the upper edge of the last: (NBINS + 1,)."""
    bits = (np.arange(NBINS + 1, dtype=np.int64) << SHIFT).clip(max=0x7F800000)  # up to inf
    return bits.astype(np.int32).view(np.float32).astype(np.float64)


def percentiles_from_hist(counts: np.ndarray, qs=PERCENTILES) -> dict[str, float]:
    """Distance percentiles from the d^2 histogram, interpolated geometrically inside a bin."""
    edges = bin_edges()
    cum = np.cumsum(counts)
    total = cum[-1] if len(cum) else 0
    out = {}
    for q in qs:
        if total == 0:
            out[f"p{q:g}"] = math.nan
            continue
        target = q / 100 * total
        b = int(np.searchsorted(cum, target, side="left"))
        before = cum[b - 1] if b > 0 else 0
        frac = (target - before) / max(counts[b], 1)
        lo, hi = edges[b], edges[b + 1]
        d2 = hi * frac if lo <= 0 else lo * (hi / lo) ** frac
        out[f"p{q:g}"] = math.sqrt(d2)
    return out


def check_lines(threshold: float, floor: float | None = None) -> None:
    """Refuse a collision threshold or noise floor that is negative or not a number."""
    for name, value in (("threshold", threshold), ("floor", floor)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SipitError(f"{name} must be a finite number >= 0, got {value}")


class PairScan:
    """All pairs of `states` (N, d): the k closest exactly, counts under `threshold`, histogram."""

    def __init__(self, states: torch.Tensor, threshold: float = 1e-6, k: int = 10,
                 block: int = 2048, tile: int = 8192, sample: int = 1, floor: float = 0.0):
        self.x = states.float().cpu()  # (N, d), kept for exact recomputation
        self.n, self.d = self.x.shape
        self.threshold, self.k = float(threshold), int(k)
        self.floor = float(floor)  # relative: pairs under floor * max(||a||, ||b||) are near
        self.norm = self.x.double().norm(dim=1)  # (N,) raw norms, for the floor
        self.block, self.tile = int(block), max(int(tile), int(block))
        self.sample = max(1, int(sample))  # histogram keeps every sample-th row of each tile
        self.block = max(self.sample, self.block - self.block % self.sample)
        mean = self.x.double().mean(0)
        centred = self.x.double() - mean  # distances do not change; norms (and errors) shrink
        self.xc = centred.float()
        self.n2 = centred.pow(2).sum(1).float()  # (N,)
        self.acc = dict(
            row=0, pairs=0, under=0, near=0,
            hist=torch.zeros(NBINS, dtype=torch.int64),
            nn_d2=torch.full((self.n,), math.inf),  # screened nearest-neighbour d^2
            close=torch.empty(0, 3, dtype=torch.float64),  # rows (d^2, i, j), sorted
            listed=torch.empty(0, 3, dtype=torch.float64),  # collisions (d^2, i, j)
            near_listed=torch.empty(0, 3, dtype=torch.float64),  # under the floor, not listed
        )

    @property
    def rows(self) -> int:
        return math.ceil(self.n / self.block)

    @property
    def total_pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    @property
    def finished(self) -> bool:
        return self.acc["row"] >= self.rows

    def run(self, progress=None) -> dict:
        """Scan every remaining block row, then return the result."""
        while not self.finished:
            self.step()
            if progress is not None:
                progress(self.acc["pairs"], self.total_pairs)
        return self.result()

    @torch.no_grad()
    def step(self) -> None:
        """Scan block row acc["row"] against all columns to its right, then advance."""
        r0 = self.acc["row"] * self.block
        r1 = min(self.n, r0 + self.block)
        self._tile(r0, r1, r0, r1)  # the diagonal square: only j > i counts
        for c0 in range(r1, self.n, self.tile):
            self._tile(r0, r1, c0, min(self.n, c0 + self.tile))
        self.acc["row"] += 1

    def _tile(self, r0: int, r1: int, c0: int, c1: int) -> None:
        g = torch.addmm(self.n2[None, c0:c1], self.xc[r0:r1], self.xc[c0:c1].T,
                        alpha=-2.0)  # (R, C): ||b||^2 - 2 a.b
        g.add_(self.n2[r0:r1, None])  # screened d^2 (may dip below 0 by rounding)
        sample = g[::self.sample]  # rows r0, r0 + s, ... (r0 is a multiple of s)
        masked = 0
        if c0 == r0:  # the diagonal square: mask j <= i with inf
            lower = self._lower(r1 - r0)
            g.masked_fill_(lower, math.inf)
            masked = int(lower[::self.sample].sum())
        square = g.shape[0] * (g.shape[0] + 1) // 2 if c0 == r0 else 0
        self.acc["pairs"] += g.numel() - square
        bins = sample.clamp_min(0.0).view(torch.int32).reshape(-1) >> SHIFT
        self.acc["hist"] += torch.bincount(bins, minlength=NBINS)
        self.acc["hist"][INF_BIN] -= masked

        row_min = g.amin(dim=1)  # (R,)
        nn = self.acc["nn_d2"]
        nn[r0:r1] = torch.minimum(nn[r0:r1], row_min)
        nn[c0:c1] = torch.minimum(nn[c0:c1], g.amin(dim=0))
        self._exact(g, r0, c0, c1, row_min)

    def _lower(self, size: int) -> torch.Tensor:
        """Boolean (size, size) mask of j <= i, cached for the block size."""
        if getattr(self, "_mask", None) is None or self._mask.shape[0] < size:
            self._mask = torch.tril(torch.ones(size, size, dtype=torch.bool))
        return self._mask[:size, :size]

    def _screen_bound(self, r0: int, c0: int, c1: int, row_min: torch.Tensor) -> float:
        """Largest screened d^2 that might still be a collision or one of the k closest."""
        r1 = r0 + row_min.numel()
        margin = self.margin(float(self.n2[r0:r1].max() + self.n2[c0:c1].max()))
        close = self.acc["close"]
        kth = float(close[self.k - 1, 0]) if len(close) >= self.k else math.inf
        finite = row_min[torch.isfinite(row_min)]
        if len(finite) >= self.k:  # k distinct pairs of this tile bound the k-th closest
            kth = min(kth, float(finite.kthvalue(self.k).values) + margin)
        top = float(max(self.norm[r0:r1].max(), self.norm[c0:c1].max()))
        return max(self.threshold**2, (self.floor * top) ** 2, kth) + margin

    def margin(self, n2_sum: float | torch.Tensor):
        """Bound on |screened - exact| d^2 for norms^2 summing to n2_sum: the dot product's
        rounding (d u) plus those of the norms and the two additions, doubled for safety."""
        return 2 * (self.d + 8) * U32 * n2_sum

    def _exact(self, g: torch.Tensor, r0: int, c0: int, c1: int, row_min: torch.Tensor) -> None:
        """Recompute in fp64 every pair of the tile whose screened d^2 is under the bound."""
        bound = min(self._screen_bound(r0, c0, c1, row_min), 3e38)  # masked entries are inf
        rows = (row_min <= bound).nonzero()[:, 0]
        hits = (g[rows] <= bound).nonzero()  # (m, 2): index into rows, column
        for part in hits.split(EXACT_CHUNK):
            i, j = rows[part[:, 0]] + r0, part[:, 1] + c0
            d2 = (self.x[i].double() - self.x[j].double()).pow(2).sum(1)
            found = torch.stack([d2, i.double(), j.double()], 1)  # (m, 3)
            is_under = d2 < self.threshold**2
            scale = torch.maximum(self.norm[i], self.norm[j])
            is_near = (d2 < (self.floor * scale) ** 2) & ~is_under
            self._count(found[is_under], "under", "listed")
            self._count(found[is_near], "near", "near_listed")
            self.acc["close"] = _smallest(torch.cat([self.acc["close"], found]), self.k)

    def _count(self, rows: torch.Tensor, counter: str, listing: str) -> None:
        self.acc[counter] += len(rows)
        room = MAX_LISTED - len(self.acc[listing])
        if room > 0 and len(rows):
            self.acc[listing] = torch.cat([self.acc[listing], rows[:room]])

    def result(self) -> dict:
        """Exact minimum, k closest pairs, collisions, percentiles, histogram."""
        close = self.acc["close"]
        counts = self.acc["hist"].numpy()
        nz = np.nonzero(counts)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        edges = np.sqrt(bin_edges()[lo:hi + 1])
        return dict(
            n=self.n, pairs=self.acc["pairs"], threshold=self.threshold,
            min_distance=math.sqrt(float(close[0, 0])) if len(close) else math.nan,
            under_threshold=int(self.acc["under"]),
            collisions=[_pair(row) for row in self.acc["listed"]],
            floor=self.floor, under_floor=int(self.acc["near"]),
            near_collisions=[_pair(row) for row in self.acc["near_listed"]],
            closest=[_pair(row) for row in close],
            percentiles=percentiles_from_hist(counts),
            histogram=dict(edges=edges.tolist(), counts=counts[lo:hi].tolist(),
                           sample=self.sample),
        )

    @torch.no_grad()
    def group_minima(self, groups: list[int], per_group: int = 32) -> dict[int, float]:
        """Per group label (e.g. prompt length), the smallest distance from a member to its
        nearest neighbour (any group). The `per_group` members with the smallest screened
        nearest-neighbour distance are searched again in fp64 (expanded norm on centred
        states), and the distance to the neighbour found is recomputed directly."""
        nn = self.acc["nn_d2"].double()
        labels = torch.tensor(groups)
        x64 = self.x.double()
        xc = x64 - x64.mean(0)
        n2 = xc.pow(2).sum(1)
        out = {}
        for label in sorted(set(groups)):
            members = (labels == label).nonzero()[:, 0]
            cands = members[nn[members].argsort()[:per_group]]  # (m,)
            d2 = n2[cands, None] + n2[None, :] - 2 * xc[cands] @ xc.T  # (m, N)
            d2[torch.arange(len(cands)), cands] = math.inf
            found = d2.argmin(dim=1)
            out[int(label)] = float((x64[cands] - x64[found]).norm(dim=1).min())
        return out


def _smallest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k rows (d^2, i, j) with the smallest d^2; ties broken by i then j (deterministic)."""
    if len(rows) == 0:
        return rows
    a = rows.numpy()
    order = np.lexsort((a[:, 2], a[:, 1], a[:, 0]))[:k]
    return rows[torch.from_numpy(order)]


def _pair(row: torch.Tensor) -> dict:
    return dict(i=int(row[1]), j=int(row[2]), distance=math.sqrt(float(row[0])))
