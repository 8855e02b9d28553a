"""Alpha-beta cost model of one MoE layer step under every plan (DESIGN section 7).

Times are seconds for forward + backward of one layer on one rank, the sum of five named terms:

- compute: the expert GEMMs on the FILLED rows only (every plan skips unfilled capacity slots):
  forward + backward of two GEMMs on R rows is 12 * R * M * H FLOPs (18 with SwiGLU), plus the gate.
- elementwise: memory traffic: dispatch/combine, the activation, and per plan the padded all-to-all
  buffers (r >= 1) or the gathered weights and their gradients (r = 0 and r >= 1 with g > 1).
- bandwidth / latency: the collectives, t = bytes / bandwidth + messages * latency + per-call cost,
  with separate links inside a node (NVLink-class) and across nodes; plus a per-call cost of kernels.
- overlap (<= 0): what the pipelined exchange of d chunks hides. Per pass (forward: 1/3 of the GEMMs,
  backward: 2/3), with a = one chunk's all-to-all and c = one chunk's GEMMs:

      serial = d * (2a + c);   pipelined = 2a + c + (d - 1) * max(2a, c)

  (dispatch and return share the network, so a chunk's two all-to-alls serialise with each other);
  the term is -overlap * (serial - pipelined), the cluster's `overlap` saying how much is real.

At W = 1 every plan is the same local computation and costs the same. The terms are linear in the
cluster's reciprocal rates, which is what lets `flexmoe.tuning.ranker` rescale them from measured steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flexmoe.core.layout import divisors, local_experts, shards_per_expert
from flexmoe.core.plans import STATIC_DEFAULT, Plan


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Per-GPU link and compute figures of a cluster (or of this machine, once calibrated)."""

    name: str
    gpus_per_node: int
    intra_bandwidth: float  # bytes/s one rank can send to the others in its node
    inter_bandwidth: float  # bytes/s one rank can send off the node
    intra_latency: float  # seconds per message inside a node
    inter_latency: float  # seconds per message across nodes
    flops: float  # sustained GEMM FLOP/s at the layer's dtype
    memory_bandwidth: float  # bytes/s for layout transforms
    launch_overhead: float = 10e-6  # fixed cost per collective call
    kernel_overhead: float = 5e-6  # fixed cost per kernel (GEMM, element-wise op) call
    # share of the ideal all-to-all/compute overlap that is real: ~1 where the network moves data on its
    # own (NCCL on GPUs), ~0 where communication needs the same cores as the GEMMs (gloo on a 2-core CPU)
    overlap: float = 1.0

    def __post_init__(self) -> None:
        for field in ("gpus_per_node", "intra_bandwidth", "inter_bandwidth", "flops", "memory_bandwidth"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")


# Presets from public vendor specifications (per GPU):
# - DGX A100: 8 x A100-SXM 80GB, NVLink 3 at 600 GB/s bidirectional (300 GB/s each way), 8 x 200 Gb/s
#   HDR InfiniBand (one 25 GB/s NIC per GPU); A100 dense BF16 peak 312 TFLOP/s, HBM2e 2.0 TB/s.
# - DGX H100: NVLink 4 at 900 GB/s bidirectional (450 GB/s each way), 8 x 400 Gb/s NDR (50 GB/s per
#   GPU); H100-SXM dense BF16 peak 989 TFLOP/s, HBM3 3.35 TB/s.
# Sustained rates are taken as ~70% of the link peaks and ~60% of the GEMM peaks.
PRESETS = {
    "a100": ClusterSpec(
        name="8 x A100 per node, NVLink 3 + HDR InfiniBand",
        gpus_per_node=8,
        intra_bandwidth=0.7 * 300e9,
        inter_bandwidth=0.7 * 25e9,
        intra_latency=5e-6,
        inter_latency=15e-6,
        flops=0.6 * 312e12,
        memory_bandwidth=0.8 * 2.0e12,
    ),
    "h100": ClusterSpec(
        name="8 x H100 per node, NVLink 4 + NDR InfiniBand",
        gpus_per_node=8,
        intra_bandwidth=0.7 * 450e9,
        inter_bandwidth=0.7 * 50e9,
        intra_latency=4e-6,
        inter_latency=12e-6,
        flops=0.6 * 989e12,
        memory_bandwidth=0.8 * 3.35e12,
    ),
    # This kind of development machine: 2 CPU cores, gloo over loopback (about 0.4 GB/s all-to-all, see
    # `flexmoe bench dist`), fp32 GEMMs at about 70 GFLOP/s; `calibrate` measures the real figures.
    # `flexmoe bench dist` measured no gain from d > 1 on it (gloo and the GEMMs share the 2 cores).
    "cpu-gloo": ClusterSpec(
        name="CPU processes, gloo over loopback",
        gpus_per_node=64,
        intra_bandwidth=0.4e9,
        inter_bandwidth=0.4e9,
        intra_latency=100e-6,
        inter_latency=100e-6,
        flops=70e9,
        memory_bandwidth=5e9,
        launch_overhead=200e-6,
        kernel_overhead=20e-6,
        overlap=0.0,
    ),
}


def default_cluster(device) -> ClusterSpec:
    return PRESETS["h100" if device is not None and torch.device(device).type == "cuda" else "cpu-gloo"]


def with_node_size(cluster: ClusterSpec, node_size: int | None) -> ClusterSpec:
    """The cluster with the node size the layer's process groups really have (ExpertGroups.node_size:
    where they run the 2DH all-to-all, its phases span that many ranks), whatever the preset or
    calibration says; None keeps the cluster's. With a node of 64 (the CPU preset) a 2DH on nodes of
    2 was priced as a flat exchange, and the tuner walked 2DH candidates that are slower in every
    measurement at W = 4 on loopback."""
    if node_size is None or node_size == cluster.gpus_per_node:
        return cluster
    return replace(cluster, gpus_per_node=node_size)


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    model_dim: int
    hidden_dim: int
    num_experts: int
    world_size: int
    capacity: int  # C per (rank, expert), as routing produced it
    tokens: int  # tokens per rank
    top_k: int = 2
    # element sizes (mixed precision): the expert compute dtype's, which the all-to-alls and the weight
    # all-gathers carry (2 for bf16/fp16 under autocast, 4 in fp32), and the master parameters' into
    # which gathered weights' gradients are reduce-scattered (None: the same)
    bytes_per_element: int = 2
    master_bytes_per_element: int | None = None
    swiglu: bool = False

    @property
    def shards_per_expert(self) -> int:
        return shards_per_expert(self.num_experts, self.world_size)

    @property
    def local_experts(self) -> int:
        return local_experts(self.num_experts, self.world_size)

    @property
    def expert_params(self) -> int:
        fc1 = (3 if self.swiglu else 2) * self.model_dim * self.hidden_dim
        return fc1 + (2 if self.swiglu else 1) * self.hidden_dim + self.model_dim

    @property
    def filled_rows(self) -> int:
        """R: the (token, expert) assignments a rank keeps, which is also the rows a rank multiplies
        in every plan when the load is balanced (r = 0: its own; r >= 1: the ones sent to it)."""
        return min(self.tokens * self.top_k, self.num_experts * self.capacity)


TERMS = ("compute", "elementwise", "bandwidth", "latency", "overlap")


def expert_flops(shape: LayerShape) -> float:
    """Forward + backward of the two expert GEMMs on the filled rows: 2 FLOPs per multiply-add, the
    backward twice the forward (input and weight gradients): 3 * 2 * (R*M*X + R*H*M), X = H or 2H."""
    width = 3 if shape.swiglu else 2  # fc1 (1 or 2 H-wide) + fc2
    return 6 * width * shape.filled_rows * shape.model_dim * shape.hidden_dim


def gate_flops(shape: LayerShape) -> float:
    return 6 * shape.tokens * shape.model_dim * shape.num_experts


def all_to_all_bytes(shape: LayerShape, plan: Plan) -> float:
    """One rank's send buffer of ONE exchange (a step has four: dispatch, return, and their gradients):
    [E, r * C, M] elements, all of them, padding included (the row counts say what to multiply)."""
    return shape.num_experts * plan.r * shape.capacity * shape.model_dim * shape.bytes_per_element


def token_rows(shape: LayerShape) -> float:
    """Rows one rank sends in ONE exchange of all_to_all "dedup": each token once to every rank that
    holds any of its k experts; with experts drawn uniformly, T * W * (1 - (1 - 1/W)^k), at most
    the assignments it keeps."""
    W, k = shape.world_size, shape.top_k
    return min(shape.filled_rows, shape.tokens * W * (1 - (1 - 1 / W) ** k))


def gathered_ranks(shape: LayerShape, plan: Plan) -> int:
    """g: how many ranks' shards one rank all-gathers (W for r = 0, s / r for r >= 1)."""
    return shape.world_size if plan.r == 0 else shape.shards_per_expert // plan.r


def gather_bytes(shape: LayerShape, plan: Plan, *, master: bool = False) -> float:
    """Bytes one rank holds of the expert parameters (1/W of all), which it sends in the all-gather
    (compute dtype); with `master`, in the reduce-scatter of their gradients (master dtype)."""
    b = shape.bytes_per_element
    if master and shape.master_bytes_per_element is not None:
        b = shape.master_bytes_per_element
    return shape.num_experts * shape.expert_params * b / shape.world_size


def candidate_plans(shape: LayerShape, *, two_dh: bool, degrees=(1, 2, 4, 8)) -> list[Plan]:
    """Every plan of the tuner's space: r = 0, every divisor r of s, times d, times the algorithms;
    with whole experts per rank (s = 1) and k > 1, r = 1 with each token sent once per rank ("dedup",
    d = 1)."""
    algorithms = ("flat", "2dh") if two_dh else ("flat",)
    plans = [Plan(r=0)]
    for r in divisors(shape.shards_per_expert):
        plans += [Plan(r=r, d=d, all_to_all=a) for d in degrees for a in algorithms]
    if shape.shards_per_expert == 1 and shape.top_k > 1:
        plans.append(Plan(r=1, d=1, all_to_all="dedup"))
    return plans


class CostModel:
    def __init__(self, cluster: ClusterSpec):
        self.cluster = cluster

    # -- collectives -------------------------------------------------------------------------------
    def all_to_all_parts(self, nbytes: float, world_size: int, algorithm: str) -> tuple[float, float, float]:
        """all_to_all() as (bandwidth, latency, elementwise) seconds: the slower link of a flat
        exchange decides; 2DH adds both phases and its layout transform."""
        c, W = self.cluster, world_size
        if W == 1:
            return 0.0, 0.0, 0.0
        L = min(c.gpus_per_node, W)
        nodes = max(1, W // L)
        if algorithm == "flat" or nodes == 1:
            intra = (nbytes * (L - 1) / W / c.intra_bandwidth, (L - 1) * c.intra_latency)
            inter = (nbytes * (W - L) / W / c.inter_bandwidth, (W - L) * c.inter_latency)
            bw, lat = max(intra, inter, key=sum)
            return bw, lat + c.launch_overhead, 0.0
        bw = nbytes * (L - 1) / L / c.intra_bandwidth + nbytes * (nodes - 1) / nodes / c.inter_bandwidth
        lat = (L - 1) * c.intra_latency + (nodes - 1) * c.inter_latency + 2 * c.launch_overhead
        return bw, lat, 2 * nbytes / c.memory_bandwidth

    def all_to_all(self, nbytes: float, world_size: int, algorithm: str) -> float:
        """nbytes: the whole send buffer of one rank (1/W of it stays on the rank)."""
        return sum(self.all_to_all_parts(nbytes, world_size, algorithm))

    def all_gather_parts(
        self, nbytes_per_rank: float, ranks: int, *, spans_nodes: bool
    ) -> tuple[float, float]:
        if ranks <= 1:
            return 0.0, 0.0
        c = self.cluster
        bw, lat = (
            (c.inter_bandwidth, c.inter_latency) if spans_nodes else (c.intra_bandwidth, c.intra_latency)
        )
        return nbytes_per_rank * (ranks - 1) / bw, (ranks - 1) * lat + c.launch_overhead

    def all_gather(self, nbytes_per_rank: float, ranks: int, *, spans_nodes: bool) -> float:
        return sum(self.all_gather_parts(nbytes_per_rank, ranks, spans_nodes=spans_nodes))

    # -- the layer -----------------------------------------------------------------------------------
    def terms(self, shape: LayerShape, plan: Plan) -> dict[str, float]:
        """Predicted forward + backward seconds of one layer on one rank, by term (they sum to it)."""
        c, W = self.cluster, shape.world_size
        if W == 1:
            plan = Plan(r=0)  # one process: every plan runs the same local computation
        b, M, R = shape.bytes_per_element, shape.model_dim, shape.filled_rows
        X = (2 if shape.swiglu else 1) * shape.hidden_dim
        gemm = expert_flops(shape) / c.flops
        # dispatch + combine of the filled rows and the activation, forward and backward
        memory = (8 * R * M + 6 * R * X) * b
        t = dict.fromkeys(TERMS, 0.0)
        t["compute"] = gemm + gate_flops(shape) / c.flops
        g = gathered_ranks(shape, plan)
        if g > 1:  # all-gather forward (compute dtype), reduce-scatter backward (master dtype)
            for master in (False, True):
                nbytes = gather_bytes(shape, plan, master=master)
                bw, lat = self.all_gather_parts(nbytes, g, spans_nodes=g > c.gpus_per_node)
                t["bandwidth"] += bw
                t["latency"] += lat
            memory += 4 * g * gather_bytes(shape, plan)  # the gathered copy and its gradient
        if plan.r == 0:
            experts_per_call, calls = shape.num_experts, 1
        elif plan.all_to_all == "dedup":
            nbytes = token_rows(shape) * M * b
            bw, lat, _ = self.all_to_all_parts(nbytes, W, "flat")
            t["bandwidth"] += 4 * bw
            # + the small exchanges: the counts, the assignments' rows with their gate weights, and
            # the weights' gradient
            t["latency"] += 7 * lat + c.launch_overhead
            memory += 8 * nbytes  # the sent rows gathered, and the returned rows added, both ways
            experts_per_call, calls = shape.local_experts, 1
        else:
            d = plan.d
            bw, lat, transform = self.all_to_all_parts(all_to_all_bytes(shape, plan) / d, W, plan.all_to_all)
            a = bw + lat + transform
            for share in (1 / 3, 2 / 3):  # forward, backward
                chunk = gemm * share / d
                serial = d * (2 * a + chunk)
                pipelined = 2 * a + chunk + (d - 1) * max(2 * a, chunk)
                t["overlap"] -= c.overlap * (serial - pipelined)
            t["bandwidth"] += 4 * d * bw
            t["latency"] += 4 * d * lat + c.launch_overhead  # + the row counts' small exchange
            # the padded buffer: dispatch, chunk copies, layout transforms, unpack, concatenation
            memory += 12 * all_to_all_bytes(shape, plan)
            t["elementwise"] += 4 * d * transform  # 2DH's layout transforms
            experts_per_call, calls = shape.local_experts, d
        t["elementwise"] += memory / c.memory_bandwidth
        # per grouped FFN call and expert: 2 GEMMs + activation forward, 4 GEMMs + its gradient backward
        t["latency"] += 8 * experts_per_call * calls * c.kernel_overhead
        return t

    def step_time(self, shape: LayerShape, plan: Plan) -> float:
        """Predicted forward + backward seconds of one layer on one rank."""
        return sum(self.terms(shape, plan).values())

    def rank(self, shape: LayerShape, plans: list[Plan]) -> list[tuple[Plan, float]]:
        return sorted(((p, self.step_time(shape, p)) for p in plans), key=lambda pt: pt[1])

    def best(self, shape: LayerShape, *, two_dh: bool = True) -> tuple[Plan, float, float]:
        """(best plan, its time, the static default's time)."""
        plans = candidate_plans(shape, two_dh=two_dh and shape.world_size > self.cluster.gpus_per_node)
        plan, t = self.rank(shape, plans)[0]
        return plan, t, self.step_time(shape, STATIC_DEFAULT)
