"""Alpha-beta cost model of one MoE layer step under every plan (DESIGN section 7).

Times are seconds for forward + backward of one layer on one rank. Collectives follow the usual
alpha-beta form t = messages * alpha + bytes / bandwidth, with separate links inside a node
(NVLink-class) and across nodes (network). The expert GEMMs run at a sustained FLOP rate. The
pipelined exchange of d chunks overlaps the all-to-alls with the GEMMs:

    t(d) = a + c + a + (d - 1) * max(2a, c)    with a = A / d + latency, c = compute / d

(dispatch and return share the network, so a chunk's two all-to-alls serialise with each other).
A cluster's `overlap` scales how much of that ideal hiding is real: t = serial - overlap * (serial - t(d)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexmoe.layout import divisors, local_experts, shards_per_expert
from flexmoe.plans import STATIC_DEFAULT, Plan


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
    launch_overhead: float = 10e-6  # fixed cost per collective or kernel batch
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
        overlap=0.0,
    ),
}


def default_cluster(device) -> ClusterSpec:
    return PRESETS["h100" if device is not None and torch.device(device).type == "cuda" else "cpu-gloo"]


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
        return fc1 + self.hidden_dim + self.model_dim


def candidate_plans(shape: LayerShape, *, two_dh: bool, degrees=(1, 2, 4, 8)) -> list[Plan]:
    """Every plan of the tuner's space: r = 0, every divisor r of s, times d, times the algorithms."""
    algorithms = ("flat", "2dh") if two_dh else ("flat",)
    plans = [Plan(r=0)]
    for r in divisors(shape.shards_per_expert):
        plans += [Plan(r=r, d=d, all_to_all=a) for d in degrees for a in algorithms]
    return plans


class CostModel:
    def __init__(self, cluster: ClusterSpec):
        self.cluster = cluster

    # -- collectives -------------------------------------------------------------------------------
    def all_to_all(self, nbytes: float, world_size: int, algorithm: str) -> float:
        """nbytes: the whole send buffer of one rank (1/W of it stays on the rank)."""
        c, W = self.cluster, world_size
        if W == 1:
            return 0.0
        L = min(c.gpus_per_node, W)
        nodes = max(1, W // L)
        if algorithm == "flat" or nodes == 1:
            intra = nbytes * (L - 1) / W / c.intra_bandwidth + (L - 1) * c.intra_latency
            inter = nbytes * (W - L) / W / c.inter_bandwidth + (W - L) * c.inter_latency
            return max(intra, inter) + c.launch_overhead
        # 2DH: intra-node phase, a layout transform, then an inter-node phase with (nodes - 1) messages
        intra = nbytes * (L - 1) / L / c.intra_bandwidth + (L - 1) * c.intra_latency
        transform = 2 * nbytes / c.memory_bandwidth
        inter = nbytes * (nodes - 1) / nodes / c.inter_bandwidth + (nodes - 1) * c.inter_latency
        return intra + transform + inter + 2 * c.launch_overhead

    def all_gather(self, nbytes_per_rank: float, ranks: int, *, spans_nodes: bool) -> float:
        if ranks <= 1:
            return 0.0
        c = self.cluster
        bw, lat = (
            (c.inter_bandwidth, c.inter_latency) if spans_nodes else (c.intra_bandwidth, c.intra_latency)
        )
        return nbytes_per_rank * (ranks - 1) / bw + (ranks - 1) * lat + c.launch_overhead

    # -- the layer -----------------------------------------------------------------------------------
    def step_time(self, shape: LayerShape, plan: Plan) -> float:
        """Predicted forward + backward seconds of one layer on one rank."""
        c, W, E = self.cluster, shape.world_size, shape.num_experts
        s, b = shape.shards_per_expert, shape.bytes_per_element
        b_master = shape.master_bytes_per_element or b
        M, H = shape.model_dim, shape.hidden_dim
        width = 3 if shape.swiglu else 2
        if plan.r == 0:
            rows = shape.tokens * shape.top_k
            compute = 3 * width * rows * M * H / c.flops
            shard_params = E * shape.expert_params / W
            spans = c.gpus_per_node < W
            gather = self.all_gather(shard_params * b, W, spans_nodes=spans)
            scatter = self.all_gather(shard_params * b_master, W, spans_nodes=spans)  # same traffic shape
            return compute + gather + scatter  # all-gather forward, reduce-scatter backward
        g = s // plan.r
        send_bytes = E * plan.r * shape.capacity * M * b
        compute = 3 * width * E * shape.capacity * M * H / c.flops  # forward + 2x backward
        spans = g > c.gpus_per_node
        gather = self.all_gather(shape.expert_params * b / s, g, spans_nodes=spans)
        # + the reduce-scatter of the gradients, in the master dtype
        gather += self.all_gather(shape.expert_params * b_master / s, g, spans_nodes=spans)
        a = self.all_to_all(send_bytes / plan.d, W, plan.all_to_all)
        # forward: c_f = compute / 3; backward: 2 / 3 of it; both pipelined the same way
        total = 0.0
        for share in (1 / 3, 2 / 3):
            chunk = compute * share / plan.d
            serial = plan.d * (2 * a + chunk)
            overlapped = 2 * a + chunk + (plan.d - 1) * max(2 * a, chunk)
            total += serial - c.overlap * (serial - overlapped)
        return total + gather

    def rank(self, shape: LayerShape, plans: list[Plan]) -> list[tuple[Plan, float]]:
        return sorted(((p, self.step_time(shape, p)) for p in plans), key=lambda pt: pt[1])

    def best(self, shape: LayerShape, *, two_dh: bool = True) -> tuple[Plan, float, float]:
        """(best plan, its time, the static default's time)."""
        plans = candidate_plans(shape, two_dh=two_dh and shape.world_size > self.cluster.gpus_per_node)
        plan, t = self.rank(shape, plans)[0]
        return plan, t, self.step_time(shape, STATIC_DEFAULT)
