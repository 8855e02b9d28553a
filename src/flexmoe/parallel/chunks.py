"""Where each row of the pipelined exchange lives: the senders' buffer, its d chunks, and the rows
the receiving experts multiply (DESIGN 4).

Legend: W ranks, L local experts, B = W * L blocks (rank-major: block w * L + l holds the rows bound
for local expert l of rank w), d chunks, M model dim, f a block's rows that hold a token: a prefix of
its rows (routing fills slots in order), R rows of a received chunk.

Two layouts of the same rows; the results do not depend on which one runs, nor on d:
- PackedChunks (the flat all-to-all): only rows that hold a token travel. Each block's f rows are
  cut into d nearly equal runs and chunk i takes run i of every block, [blocks][rows]: rank w's rows
  are one run of the chunk, sent with per-rank sizes. Nothing is padded or zero-filled, and the bytes
  follow the tokens rather than the fullest expert's capacity, which dropless routing sets (several
  times the mean load when the routing is skewed). The receivers learn the sizes from one small
  all-to-all of the counts, waited before the chunks start.
- PaddedChunks (any all-to-all; 2DH's two hops need equal blocks): the same runs, each at the start
  of c = Cp / d rows of its block (Cp the blocks' capacity), [d, W, L, c, M]: chunk-major, each chunk
  one contiguous block. The counts travel beside the chunks and say which received rows to multiply.
  Both layouts put the same rows in the same chunk, so 2DH stays bit-identical to the flat exchange.

A chunk's route (PackedRoute, PaddedRoute) moves it to the experts and back, and picks the received
rows the experts multiply, grouped by local expert (the flexible layout [L, W, rows]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flexmoe.ops.expert_ffn import padded_slots, pays_to_pad
from flexmoe.ops.runs import concatenated_runs, expert_major
from flexmoe.parallel.comm import AllToAllHandle


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    return t.cumsum(0) - t


def split_runs(filled: torch.Tensor, d: int) -> torch.Tensor:
    """counts [...] -> [d, ...]: run i of a count f is its rows f * i // d .. f * (i + 1) // d - 1."""
    i = torch.arange(d + 1, device=filled.device).view(-1, *([1] * filled.dim()))
    bounds = filled.unsqueeze(0) * i // d
    return bounds[1:] - bounds[:-1]


def place_in_runs(slot_N: torch.Tensor, filled_B: torch.Tensor, *, capacity: int, d: int):
    """Rows of [B, capacity] that hold a token (row p < f of its block) -> (block, chunk: the run of
    split_runs that holds it, place in that run)."""
    block_N, position_N = slot_N // capacity, slot_N % capacity
    f_N = filled_B[block_N]
    chunk_N = ((position_N + 1) * d - 1) // f_N  # the largest i with f * i // d <= position
    return block_N, chunk_N, position_N - f_N * chunk_N // d


# -- padded: fixed-size blocks ----------------------------------------------------------------------


def _to_flexible(recv_WLcM: torch.Tensor) -> torch.Tensor:
    """[W, L, c, M] -> [L * W * c, M]: each local expert's rows from every rank contiguous, so the
    expert GEMMs keep one large shape at any W."""
    W, L, c, M = recv_WLcM.shape
    return recv_WLcM.permute(1, 0, 2, 3).reshape(L * W * c, M)


def _from_flexible(rows: torch.Tensor, W: int, L: int, c: int) -> torch.Tensor:
    return rows.view(L, W, c, -1).permute(1, 0, 2, 3).contiguous()


@dataclass(frozen=True)
class FilledRows:
    """The rows of one received padded chunk that the experts multiply, grouped by local expert (the
    flexible layout [L, W, rows]): those that hold a token, and, when every local expert is padded to
    the same row count (small, nearly equal groups: ops.expert_ffn.pays_to_pad), some empty ones, so
    that the grouped FFN runs as one batched GEMM. Empty rows are zeros from the sender; their outputs
    go back to slots the sender never reads, and their gradients are zeros, so the padding changes no
    result."""

    source: torch.Tensor | None  # the rows multiplied, as rows of the received [W, L, c]; None: all
    sizes: tuple[int, ...]  # rows per local expert, the grouped FFN's group sizes

    @staticmethod
    def from_counts(
        filled_WL: Sequence[Sequence[int]], c: int, hidden_width: int, device: torch.device | str
    ) -> FilledRows:
        """filled_WL (host-side numbers): rows of the chunk that sender w filled for local expert l (a
        prefix of its c); hidden_width: the experts' fc1 width (what a row costs in the activation's
        memory)."""
        W, L = len(filled_WL), len(filled_WL[0])
        sizes = tuple(sum(column) for column in zip(*filled_WL, strict=True))
        total, n = sum(sizes), max(sizes)
        if total == L * W * c:
            return FilledRows(None, sizes)
        padded = pays_to_pad(L * n - total, total, n * hidden_width)
        if padded and n == W * c:  # padded to every row: nothing to pick
            return FilledRows(None, (n,) * L)
        # expert l takes the filled rows of sender w's block (w * L + l) for every w, then, padded, its
        # first n - size empty rows in the same order (distinct rows: no index repeats), as the packed
        # layout pads, so that both sum in the same order
        starts, lengths = [], []
        for l in range(L):
            blocks = [(w * L + l) * c for w in range(W)]
            filled = [filled_WL[w][l] for w in range(W)]
            starts += blocks
            lengths += filled
            need = n - sizes[l] if padded else 0
            for block, f in zip(blocks, filled, strict=True):
                if need > 0:
                    starts.append(block + f)
                    lengths.append(min(need, c - f))
                    need -= lengths[-1]
        source = concatenated_runs(starts, lengths, torch.device(device))
        return FilledRows(source, (n,) * L if padded else sizes)

    def gather(self, recv_WLcM: torch.Tensor) -> torch.Tensor:
        """The rows to multiply, grouped by local expert, from a received chunk: one copy either way
        (a gather of the chosen rows, or the reordering of all of them)."""
        if self.source is None:
            return _to_flexible(recv_WLcM)
        return recv_WLcM.reshape(-1, recv_WLcM.shape[-1]).index_select(0, self.source)

    def scatter(self, rows_NM: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The experts' output rows back to the [W, L, c, M] layout they came in; the rows without a
        token (their senders never read them) are zeros or padding outputs."""
        W, L, c = shape
        if self.source is None:
            return _from_flexible(rows_NM, W, L, c)
        out = rows_NM.new_zeros(W * L * c, rows_NM.shape[1])
        return out.index_copy_(0, self.source, rows_NM).view(W, L, c, -1)


@dataclass(frozen=True)
class PaddedRoute:
    """One padded chunk: [W, L, c, M] both ways, by `algorithm` ("flat" or "2dh")."""

    rows: FilledRows
    shape: tuple[int, int, int]  # (W, L, c)
    algorithm: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.rows.sizes

    def gather(self, received: torch.Tensor) -> torch.Tensor:
        return self.rows.gather(received)

    def scatter(self, rows_NM: torch.Tensor) -> torch.Tensor:
        return self.rows.scatter(rows_NM, self.shape)

    def to_experts(self, groups, chunk: torch.Tensor) -> AllToAllHandle:
        return groups.all_to_all_start(chunk, self.algorithm)

    def to_senders(self, groups, out_rows: torch.Tensor, out: torch.Tensor) -> AllToAllHandle:
        return groups.all_to_all_start(out_rows, self.algorithm, out=out)


class PaddedChunks:
    """The senders' buffer [d, W, L, c, M] (c = Cp / d), for any all-to-all: chunk i holds run i of
    every block (split_runs, at most c rows), then empty rows."""

    def __init__(self, filled_B: torch.Tensor, *, world_size: int, capacity: int, d: int, algorithm: str):
        W, c = world_size, capacity // d
        L = filled_B.numel() // W
        self.d, self.shape, self.algorithm = d, (d, W, L, c), algorithm
        self.filled_B, self.capacity = filled_B, capacity
        self.num_rows = d * W * L * c
        self.counts = split_runs(filled_B, d).view(d, W, L).permute(1, 2, 0)  # [W, L, d]

    def rows(self, slot_N: torch.Tensor) -> torch.Tensor:
        """The buffer row of each row of [B, Cp] (the blocks with their capacity) that holds a token."""
        block_N, chunk_N, offset_N = place_in_runs(slot_N, self.filled_B, capacity=self.capacity, d=self.d)
        _, W, L, c = self.shape
        return (chunk_N * (W * L) + block_N) * c + offset_N

    def chunks(self, buffer_SM: torch.Tensor) -> list[torch.Tensor]:
        return list(buffer_SM.view(*self.shape, -1).unbind(0))

    def start(self, send_SM: torch.Tensor, groups, hidden_width: int) -> Inbound:
        counts = groups.all_to_all_start(self.counts.contiguous(), "flat")  # travels beside the chunks
        chunks = [groups.all_to_all_start(chunk, self.algorithm) for chunk in self.chunks(send_SM)]
        _, W, L, c = self.shape

        def routes() -> list[PaddedRoute]:
            received_dWL = counts.wait().permute(2, 0, 1).tolist()  # one host sync for all d chunks
            return [
                PaddedRoute(
                    FilledRows.from_counts(received_dWL[i], c, hidden_width, send_SM.device),
                    (W, L, c),
                    self.algorithm,
                )
                for i in range(self.d)
            ]

        return Inbound(routes, chunks)


# -- packed: only the rows that hold a token --------------------------------------------------------


class PackedRoute:
    """One packed chunk: rows [ranks][local experts][rows] both ways, by the flat all-to-all with
    per-rank sizes. The received rows are regrouped by local expert with one gather, and the outputs
    put back in the order they came with one more (no row is empty, so nothing is zero-filled)."""

    def __init__(
        self,
        received_WL: Sequence[Sequence[int]],
        send_rows: Sequence[int],
        hidden_width: int,
        device: torch.device,
    ):
        """received_WL (host-side numbers): the chunk's rows from sender w for local expert l."""
        W, L = len(received_WL), len(received_WL[0])
        self.send_rows = list(send_rows)
        self.recv_rows = [sum(row) for row in received_WL]
        self.num_received = R = sum(self.recv_rows)
        sizes = tuple(sum(column) for column in zip(*received_WL, strict=True))
        n = max(sizes, default=0)
        self.padded = pays_to_pad(L * n - R, R, n * hidden_width)
        if (W == 1 or L == 1) and not self.padded:  # received in the flexible order already
            self.source = self.inverse = None
            self.sizes = sizes
            return
        # flexible row j (expert l, then sender w, then its rows) is a received row of sender w's run
        # for expert l; the runs arrive sender-major
        source = expert_major(received_WL, device)
        # where each flexible row goes among the rows multiplied (after each expert's padding, if any)
        flexible = padded_slots(sizes, n, device) if self.padded else torch.arange(R, device=device)
        self.inverse = torch.empty_like(flexible).index_copy_(0, source, flexible)
        if self.padded:  # every expert padded to n rows with copies of a zero row (row R, see to_experts)
            source = source.new_full((L * n,), R).index_copy_(0, flexible, source)
            sizes = (n,) * L
        self.sizes = sizes
        self.source = source

    def gather(self, received: torch.Tensor) -> torch.Tensor:
        return received if self.source is None else received.index_select(0, self.source)

    def scatter(self, rows_NM: torch.Tensor) -> torch.Tensor:
        return rows_NM if self.inverse is None else rows_NM.index_select(0, self.inverse)

    def to_experts(self, groups, chunk: torch.Tensor) -> AllToAllHandle:
        R = self.num_received
        received = chunk.new_empty(R + self.padded, chunk.shape[1])  # padded: one zero row after the R
        if self.padded:
            received[R].zero_()
        handle = groups.all_to_all_rows_start(chunk, self.send_rows, self.recv_rows, out=received[:R])

        def finish() -> torch.Tensor:
            handle.wait()
            return received

        return AllToAllHandle(finish)

    def to_senders(self, groups, out_rows: torch.Tensor, out: torch.Tensor) -> AllToAllHandle:
        return groups.all_to_all_rows_start(out_rows, self.recv_rows, self.send_rows, out=out)


class PackedChunks:
    """The senders' buffer of only the rows that hold a token: chunk-major, [d][blocks][run rows]."""

    def __init__(self, filled_B: torch.Tensor, *, world_size: int, capacity: int, d: int):
        W = world_size
        self.d, self.filled_B, self.capacity = d, filled_B, capacity
        self.counts = filled_B.view(W, -1)  # what each rank learns: its local experts' rows from w
        runs_dB = split_runs(filled_B, d)
        self.first_dB = _exclusive_cumsum(runs_dB.reshape(-1)).view_as(runs_dB)
        self.send_rows = runs_dB.view(d, W, -1).sum(-1).tolist()  # [d][W]
        self.chunk_rows = [sum(rows) for rows in self.send_rows]
        self.num_rows = sum(self.chunk_rows)

    def rows(self, slot_N: torch.Tensor) -> torch.Tensor:
        """The buffer row of each row of [B, Cp] (the blocks with their capacity) that holds a token."""
        block_N, chunk_N, offset_N = place_in_runs(slot_N, self.filled_B, capacity=self.capacity, d=self.d)
        return self.first_dB[chunk_N, block_N] + offset_N

    def chunks(self, buffer_SM: torch.Tensor) -> list[torch.Tensor]:
        return list(buffer_SM.split(self.chunk_rows))

    def start(self, send_SM: torch.Tensor, groups, hidden_width: int) -> Inbound:
        # the receivers must know the sizes before the chunks start: the counts go first
        received_WL = groups.all_to_all_start(self.counts, "flat").wait()
        runs_dWL = split_runs(received_WL, self.d).tolist()  # one host sync; the sizes are host-side
        device = send_SM.device
        routes = [PackedRoute(runs_dWL[i], self.send_rows[i], hidden_width, device) for i in range(self.d)]
        chunks = [
            route.to_experts(groups, chunk) for route, chunk in zip(routes, self.chunks(send_SM), strict=True)
        ]
        return Inbound(lambda: routes, chunks)


@dataclass
class Inbound:
    """The chunks on their way to the experts, and (once the counts are in) their routes."""

    routes: Callable[[], list]
    chunks: list[AllToAllHandle]


def chunk_layout(filled_B: torch.Tensor, *, world_size: int, capacity: int, d: int, algorithm: str):
    """The layout of blocks of `capacity` rows, `filled_B` of each holding a token: PackedChunks for the
    flat all-to-all, PaddedChunks for the others."""
    if algorithm == "flat":
        return PackedChunks(filled_B, world_size=world_size, capacity=capacity, d=d)
    return PaddedChunks(filled_B, world_size=world_size, capacity=capacity, d=d, algorithm=algorithm)


__all__ = [
    "FilledRows",
    "Inbound",
    "PackedChunks",
    "PackedRoute",
    "PaddedChunks",
    "PaddedRoute",
    "chunk_layout",
    "place_in_runs",
    "split_runs",
]
