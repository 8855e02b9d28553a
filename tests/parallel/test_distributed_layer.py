"""Every plan on W gloo ranks equals the single-process layer (float64, 1e-9).

Each rank returns its output and its shard gradients; the reference runs here, in the pytest
process, on one process: the same layer (same seed) applied to each rank's tokens, with expert
gradients of the SUM of all ranks' losses sliced by the layout, and gate gradients per rank (or, with
routing given from outside, the gradients of the routing weights).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan
from flexmoe.bench.host_syncs import count_host_syncs
from flexmoe.core.layout import divisors
from flexmoe.testing.distributed import DistributedPool
from flexmoe.tuning.cost_model import PRESETS
from flexmoe.tuning.tuner import TunerConfig

M, H = 8, 16
EXPERT_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _cases(W: int) -> list[dict]:
    cases = []
    for E in (1, 2, 4, 8):
        s = max(1, W // E)
        algorithms = ("flat", "2dh") if W == 4 else ("flat",)
        plans = [Plan(r=0)] + [
            Plan(r=r, d=d, all_to_all=a) for r, d, a in itertools.product(divisors(s), (1, 2, 4), algorithms)
        ]
        if s == 1:  # whole experts: each token sent once per rank
            plans += [Plan(r=1, all_to_all="dedup")] * 3
        for i, plan in enumerate(plans):
            cases.append(
                dict(
                    E=E,
                    plan=plan,
                    k=min(2, E),
                    cf=1.0 if i % 2 else 0.5,
                    act=("gelu", "swiglu", "relu")[i % 3],
                    seed=100 * E + i,
                    tokens=[12] * W,
                )
            )
    # dropless with uneven token counts, including an empty rank
    for E in (1, 2, 8):
        s = max(1, W // E)
        dedup = [Plan(r=1, all_to_all="dedup")] if s == 1 else []
        if s == 1 and E > 1:  # scores before the experts; a shared expert beside them
            for extra in ({"post": False}, {"shared": 8}):
                cases.append(
                    dict(E=E, plan=dedup[0], k=2, cf=0.0, act="gelu", seed=3 + E, tokens=[9] * W, **extra)
                )
        for plan in [Plan(r=r, d=2) for r in (0, *divisors(s))] + dedup:
            cases.append(
                dict(
                    E=E,
                    plan=plan,
                    k=min(2, E),
                    cf=0.0,
                    act="silu",
                    seed=7 + E + plan.r + len(cases),
                    tokens=[5 + 7 * i if i != 1 else 0 for i in range(W)],
                )
            )
    return cases


def _chunk_edge_cases(W: int) -> list[dict]:
    """d = 2 plans whose filled rows end exactly at a chunk edge (one chunk full, the next empty),
    where a per-chunk row count off by one row loses or misplaces the edge row. At d = 4 the chunks
    are often one row long, so every row is an edge; at d = 2 the gate's routing seldom ends there.

    Routing comes from outside, k = 1, dropless: rank w sends demand[w][e] tokens to expert e. A rank's
    buffer for an expert (Cb rows, per hidden-block copy) is split among g = s / r ranks in blocks of
    Cb / g rows, two chunks of c each. With capacity C = Cb = 4g (the largest demand) c = 2, and every
    other demand is 4q + 2: whole blocks, then one block whose filled rows end right where its second
    chunk starts."""
    cases = []
    for E in sorted({1, W // 2, W, 2 * W} - {0}):
        s = max(1, W // E)
        for r in divisors(s):
            g = s // r
            demand = [[4 * g if w == e == 0 else 4 * ((w + e) % g) + 2 for e in range(E)] for w in range(W)]
            cases.append(
                dict(
                    E=E,
                    plan=Plan(r=r, d=2),
                    k=1,
                    cf=0.0,
                    act=("gelu", "swiglu")[len(cases) % 2],
                    seed=50 + len(cases),
                    tokens=[sum(row) for row in demand],
                    demand=demand,
                )
            )
    return cases


def _inputs(case: dict, rank: int):
    gen = torch.Generator().manual_seed(case["seed"] * 31 + rank)
    x = torch.randn(case["tokens"][rank], M, generator=gen, dtype=torch.float64)
    probe = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, probe


def _outside_routing(case: dict, rank: int) -> dict:
    """top_k_index / top_k_weights of the rank's tokens when the case fixes the demand, else {} (the
    gate routes): demand[rank][e] tokens to expert e, in shuffled token order, weights in [0.5, 1.5)."""
    if "demand" not in case:
        return {}
    counts = torch.tensor(case["demand"][rank])
    gen = torch.Generator().manual_seed(case["seed"] * 37 + rank)
    experts = torch.repeat_interleave(torch.arange(case["E"]), counts)
    experts = experts[torch.randperm(experts.numel(), generator=gen)].view(-1, 1)
    weights = 0.5 + torch.rand(experts.shape, generator=gen, dtype=torch.float64)
    return {"top_k_index": experts, "top_k_weights": weights.requires_grad_()}


def _make_layer(case: dict) -> MoELayer:
    layer = MoELayer(
        M,
        H,
        case["E"],
        top_k=case["k"],
        capacity_factor=case["cf"],
        activation=case["act"],
        is_postscore=case.get("post", True),
        shared_hidden_dim=case.get("shared", 0),
        seed=case["seed"],
        dtype=torch.float64,
        local_world_size=2,
    )
    return layer.double()


def run_cases_worker(cases: list[dict]) -> list[dict]:
    rank = dist.get_rank()
    results = []
    for case in cases:
        layer = _make_layer(case)
        x, probe = _inputs(case, rank)
        x.requires_grad_(True)
        routing = _outside_routing(case, rank)
        y = layer(x, plan=case["plan"], **routing)
        (y * probe).sum().backward()
        results.append(
            {
                "y": y.detach(),
                "x_grad": x.grad,
                "gate_grad": layer.gate.weight.grad,
                "weights_grad": routing["top_k_weights"].grad if routing else None,
                "capacity": layer.last_plan.capacity,
                **{n: getattr(layer.experts, n).grad for n in EXPERT_NAMES},
                **{f"param_{n}": getattr(layer.experts, n).detach() for n in EXPERT_NAMES},
            }
        )
    return results


def _reference(case: dict, W: int):
    ref = _make_layer(case)
    outs, x_grads, gate_grads, weights_grads = [], [], [], []
    for rank in range(W):
        x, probe = _inputs(case, rank)
        x.requires_grad_(True)
        routing = _outside_routing(case, rank)
        y = ref(x, **routing)
        gate_before = None if ref.gate.weight.grad is None else ref.gate.weight.grad.clone()
        (y * probe).sum().backward()
        gate_after = ref.gate.weight.grad  # None: the routing came from outside
        gate_grads.append(
            None if gate_after is None else gate_after - (0 if gate_before is None else gate_before)
        )
        weights_grads.append(routing["top_k_weights"].grad if routing else None)
        outs.append(y.detach())
        x_grads.append(x.grad)
    full_grads = {n: getattr(ref.experts, n).grad for n in EXPERT_NAMES}
    full_params = {n: getattr(ref.experts, n).detach() for n in EXPERT_NAMES}
    return ref, outs, x_grads, gate_grads, weights_grads, full_grads, full_params


@pytest.fixture(scope="module", params=[2, 4])
def pool(request):
    with DistributedPool(request.param, collective_timeout_s=30.0, timeout_s=240.0) as p:
        yield p


@pytest.mark.timeout(300)
def test_every_plan_matches_single_process(pool):
    _check_against_single_process(pool, _cases(pool.world_size))


@pytest.mark.timeout(120)
def test_d2_chunks_ending_right_after_the_last_filled_row_match_single_process(pool):
    W = pool.world_size
    cases = _chunk_edge_cases(W)
    assert {case["plan"].r for case in cases} == set(divisors(W))
    per_rank = _check_against_single_process(pool, cases)
    for i, case in enumerate(cases):  # the capacity the edges were laid out for: C = 4g, so c = 2
        g = max(1, W // case["E"]) // case["plan"].r
        assert [res[i]["capacity"] for res in per_rank] == [4 * g] * W, case


def _check_against_single_process(pool, cases: list[dict]) -> list[list[dict]]:
    """Run the cases on the pool's ranks and compare every rank with the one-process reference;
    returns the ranks' results."""
    W = pool.world_size
    per_rank = pool.run(run_cases_worker, cases)
    for i, case in enumerate(cases):
        ref, outs, x_grads, gate_grads, weights_grads, full_grads, full_params = _reference(case, W)
        where = f"case {case}"
        for rank in range(W):
            got = per_rank[rank][i]
            shard_layout = ref.layout.__class__(
                num_experts=case["E"],
                model_dim=M,
                hidden_dim=H,
                world_size=W,
                rank=rank,
                activation=case["act"],
            )
            want_params = shard_layout.shard(full_params)
            want_grads = shard_layout.shard(full_grads)
            for n in EXPERT_NAMES:
                torch.testing.assert_close(got[f"param_{n}"], want_params[n], rtol=0, atol=0, msg=where)
                torch.testing.assert_close(got[n], want_grads[n], rtol=0, atol=1e-9, msg=f"{n} {where}")
            torch.testing.assert_close(got["y"], outs[rank], rtol=0, atol=1e-9, msg=where)
            torch.testing.assert_close(got["x_grad"], x_grads[rank], rtol=0, atol=1e-9, msg=where)
            torch.testing.assert_close(got["gate_grad"], gate_grads[rank], rtol=0, atol=1e-9, msg=where)
            torch.testing.assert_close(got["weights_grad"], weights_grads[rank], rtol=0, atol=1e-9, msg=where)
    return per_rank


def switching_worker(steps: int) -> dict:
    """Train two copies: one switches (r, d) every step, one keeps the static default."""
    W = dist.get_world_size()
    E = 2
    s = max(1, W // E)
    plans = [Plan(r=r, d=d) for r in (0, *divisors(s)) for d in (1, 2, 4)]
    results = {}
    for name in ("switching", "fixed"):
        layer = MoELayer(M, H, E, top_k=2, capacity_factor=1.0, seed=3, dtype=torch.float64).double()
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        pointers = {n: (p.data_ptr(), tuple(p.shape)) for n, p in layer.named_parameters()}
        stable = True
        for step in range(steps):
            x, probe = _inputs({"seed": step, "tokens": [10] * W}, dist.get_rank())
            plan = plans[step % len(plans)] if name == "switching" else Plan()
            versions = {n: p._version for n, p in layer.named_parameters()}
            loss = (layer(x, plan=plan) * probe).sum() + layer.aux_loss
            loss.backward()
            stable &= versions == {n: p._version for n, p in layer.named_parameters()}
            for p in layer.parameters():  # data-parallel averaging of the replicated gate
                if not getattr(p, "flexmoe_expert", False):
                    dist.all_reduce(p.grad)
                    p.grad /= W
            opt.step()
            opt.zero_grad()
        stable &= pointers == {n: (p.data_ptr(), tuple(p.shape)) for n, p in layer.named_parameters()}
        results[name] = {n: p.detach().clone() for n, p in layer.named_parameters()}
        results[f"{name}_stable"] = stable
    return results


@pytest.mark.timeout(120)
def test_switching_plans_every_step_trains_identically(pool):
    for res in pool.run(switching_worker, 8):
        assert res["switching_stable"] and res["fixed_stable"]
        for n, p in res["fixed"].items():
            torch.testing.assert_close(res["switching"][n], p, rtol=0, atol=1e-9, msg=n)


def two_dh_vs_flat_worker() -> bool:
    case = dict(E=2, k=2, cf=1.0, act="gelu", seed=5, tokens=[9] * dist.get_world_size())
    layer = _make_layer(case)
    x, _ = _inputs(case, dist.get_rank())
    r_max = max(1, dist.get_world_size() // 2)
    y_flat = layer(x, plan=Plan(r=r_max, d=2, all_to_all="flat"))
    y_2dh = layer(x, plan=Plan(r=r_max, d=2, all_to_all="2dh"))
    return bool(torch.equal(y_flat, y_2dh))


@pytest.mark.timeout(60)
def test_2dh_layer_output_is_bit_identical_to_flat(pool):
    if pool.world_size != 4:
        pytest.skip("2dh needs at least two nodes of two ranks")
    assert all(pool.run(two_dh_vs_flat_worker))


def skewed_rows_worker(d: int) -> dict:
    """Dropless routing skewed onto expert 0 (its queue several times the mean): the rows each flat
    all-to-all of the token chunks carries, forward and backward."""
    W, rank = dist.get_world_size(), dist.get_rank()
    E, T = 2 * W, 24
    case = dict(E=E, k=1, cf=0.0, act="relu", seed=11, tokens=[T] * W)
    case["demand"] = [[T - 2 * (E - 1)] + [2] * (E - 1) for _ in range(W)]  # expert 0 takes most
    layer = _make_layer(case)
    sent: list[int] = []
    real = layer.groups.all_to_all_rows_start

    def counting(x, send_rows, recv_rows, **kwargs):
        sent.append(sum(send_rows))
        return real(x, send_rows, recv_rows, **kwargs)

    layer.groups.all_to_all_rows_start = counting
    x, probe = _inputs(case, rank)
    y = layer(x, plan=Plan(r=1, d=d, all_to_all="flat"), **_outside_routing(case, rank))
    forward = list(sent)
    (y * probe).sum().backward()
    # what this rank's 2 experts receive: every rank's demand for them
    received = W * sum(case["demand"][rank][2 * rank : 2 * rank + 2])
    capacity = layer.last_plan.capacity
    return {"capacity": capacity, "received": received, "forward": forward, "backward": sent[len(forward) :]}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("d", [1, 2])
def test_the_flat_exchange_carries_only_the_rows_that_hold_a_token(pool, d):
    T, E = 24, 2 * pool.world_size
    for res in pool.run(skewed_rows_worker, d):
        assert res["capacity"] == T - 2 * (E - 1)  # a padded exchange would carry E times this
        # to the experts and back, in d chunks each way: out go this rank's T assignments (k = 1), back
        # go the rows its experts received
        for rows in (res["forward"], res["backward"]):
            assert len(rows) == 2 * d and sum(rows[:d]) == T and sum(rows[d:]) == res["received"], res


def dedup_rows_worker() -> dict:
    """Every token routed to every expert (k = E = 2W): the token rows each all-to-all carries under
    all_to_all "dedup", forward and backward."""
    W = dist.get_world_size()
    E, T = 2 * W, 6
    layer = MoELayer(M, H, E, top_k=E, capacity_factor=0.0, seed=5, dtype=torch.float64, gate=None)
    carried: list[int] = []  # rows of width M (tokens); the assignments' rows and weights are 1-wide
    real = layer.groups.all_to_all_rows_start

    def counting(x, send_rows, recv_rows, **kwargs):
        if x.dim() == 2 and x.shape[1] == M:
            carried.append(sum(send_rows))
        return real(x, send_rows, recv_rows, **kwargs)

    layer.groups.all_to_all_rows_start = counting
    x = torch.randn(T, M, dtype=torch.float64, requires_grad=True)
    top_k_index = torch.arange(E).repeat(T, 1)
    top_k_weights = torch.full((T, E), 1 / E, dtype=torch.float64)
    y = layer(x, plan=Plan(r=1, all_to_all="dedup"), top_k_index=top_k_index, top_k_weights=top_k_weights)
    forward = list(carried)
    y.sum().backward()
    return {"forward": forward, "backward": carried[len(forward) :]}


@pytest.mark.timeout(60)
def test_dedup_sends_each_token_once_to_each_rank(pool):
    W, T = pool.world_size, 6
    for res in pool.run(dedup_rows_worker):
        # out: T rows to each of the W ranks (flat would send T * 2W), back: the T each rank received
        # from each; backward the same, reversed
        assert res["forward"] == [W * T, W * T] and res["backward"] == [W * T, W * T], res


def dedup_on_split_experts_worker() -> list[str]:
    """all_to_all "dedup" with fewer experts than ranks (a fixed setting, then a forced plan)."""
    messages = []
    for make, call in (
        (lambda: MoELayer(M, H, 1, top_k=1, seed=1, all_to_all="dedup"), None),
        (lambda: MoELayer(M, H, 1, top_k=1, seed=1), Plan(r=1, all_to_all="dedup")),
    ):
        try:
            layer = make()
            layer(torch.randn(4, M), plan=call)
        except ValueError as err:
            messages.append(str(err))
    return messages


@pytest.mark.timeout(60)
def test_dedup_on_experts_split_across_ranks_is_refused(pool):
    for messages in pool.run(dedup_on_split_experts_worker):
        assert len(messages) == 2 and all("dedup' sends tokens to whole experts" in m for m in messages)


class _TransposedExperts(torch.nn.Module):
    """The Experts interface over weights stored transposed, as transformers stores its experts
    ([L, X, M] and [L, M, H]): fc1 and fc2 are transposed views (integrations' HostExperts alike)."""

    def __init__(self, experts):
        super().__init__()
        self.layout, self.activation, self.has_bias = experts.layout, experts.activation, False
        self.fc1_stored = torch.nn.Parameter(experts.fc1_weight.detach().transpose(1, 2).contiguous())
        self.fc2_stored = torch.nn.Parameter(experts.fc2_weight.detach().transpose(1, 2).contiguous())
        self.fc1_bias = self.fc2_bias = None

    @property
    def fc1_weight(self):
        return self.fc1_stored.transpose(1, 2)

    @property
    def fc2_weight(self):
        return self.fc2_stored.transpose(1, 2)

    def local_weights(self, dtype=None):
        from flexmoe.ops.expert_ffn import ExpertWeights

        w1, w2 = (w if dtype is None else w.to(dtype) for w in (self.fc1_weight, self.fc2_weight))
        return ExpertWeights(w1, None, w2, None, self.activation)


def transposed_experts_worker() -> list[dict]:
    """Every plan on experts stored transposed: the same output and gradients as on flexmoe's own
    layout, and the gradients reach the stored parameters contiguous (not strided)."""
    W, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for E, plan in ((W, Plan(r=0)), (W, Plan(r=1, d=2)), (2 * W, Plan(r=0))):
        case = dict(E=E, k=2, cf=0.0, act="swiglu", seed=5, tokens=[12] * W)
        own = MoELayer(M, H, E, top_k=2, capacity_factor=0.0, activation="swiglu", seed=5, bias=False)
        own = own.double()
        stored = MoELayer(
            M,
            H,
            E,
            top_k=2,
            capacity_factor=0.0,
            activation="swiglu",
            seed=5,
            bias=False,
            build_experts=lambda layout, own=own: _TransposedExperts(own.experts),
        ).double()
        arrived = []
        for p in (stored.experts.fc1_stored, stored.experts.fc2_stored):
            p.register_hook(lambda g, arrived=arrived: arrived.append(g.is_contiguous()))
        x, probe = _inputs(case, rank)
        ys = [layer(x, plan=plan) for layer in (own, stored)]
        for y in ys:
            (y * probe).sum().backward()
        results.append(
            {
                "y": (ys[0] - ys[1]).abs().max().item(),
                "fc1": (own.experts.fc1_weight.grad - stored.experts.fc1_stored.grad.transpose(1, 2))
                .abs()
                .max()
                .item(),
                "fc2": (own.experts.fc2_weight.grad - stored.experts.fc2_stored.grad.transpose(1, 2))
                .abs()
                .max()
                .item(),
                "arrived_contiguous": arrived,
            }
        )
    return results


@pytest.mark.timeout(60)
def test_experts_stored_transposed_get_contiguous_gradients_in_every_plan(pool):
    for per_plan in pool.run(transposed_experts_worker):
        for res in per_plan:
            assert res["y"] < 1e-12 and res["fc1"] < 1e-12 and res["fc2"] < 1e-12, res
            assert res["arrived_contiguous"] == [True, True], res


def host_syncs_worker() -> dict[str, tuple[int, int]]:
    torch.manual_seed(dist.get_rank())
    W = dist.get_world_size()
    x, out = torch.randn(32, M, requires_grad=True), {}
    algorithms = ("flat", "2dh") if W == 4 else ("flat",)
    plans = [Plan(r=0), *(Plan(r=1, d=d, all_to_all=a) for a in algorithms for d in (1, 2, 4))]
    for plan in [*plans, Plan(r=1, all_to_all="dedup")]:
        nodes = {"local_world_size": 2} if W == 4 else {}  # 2DH: two nodes of two ranks
        layer = MoELayer(M, H, 2 * W, top_k=2, capacity_factor=0.0, seed=0, **nodes)
        with count_host_syncs() as forward:
            y = layer(x, plan=plan)
        with count_host_syncs() as backward:
            (y.square().mean() + layer.aux_loss).backward()
        out[plan.describe()] = (sum(forward.values()), sum(backward.values()))
    return out


@pytest.mark.timeout(60)
def test_a_forward_waits_on_the_host_only_for_what_dropless_routing_needs(pool):
    """On a GPU each host sync stalls the launch queue. A dropless forward needs: this rank's capacity
    (its fullest expert) and the group's agreed one; then the rows per expert for r = 0's grouped
    GEMMs, or, for the exchange, the rows this rank sends and the rows it receives (2DH's fixed-size
    blocks: only the latter; "dedup": the counts of tokens and assignments both ways, read at once).
    The exchange's d chunks add none, and backward none at all."""
    for counts in pool.run(host_syncs_worker):
        r0, *r1, dedup = counts.values()
        assert r0 == (3, 0) and r1 == [(4, 0)] * 3 + [(3, 0)] * (3 if pool.world_size == 4 else 0), counts
        assert dedup == (3, 0), counts


def tuner_node_size_worker() -> int:
    layer = MoELayer(M, H, 2, seed=1, local_world_size=2)
    return layer.tuner.rank_plans.model.cluster.gpus_per_node


@pytest.mark.timeout(60)
def test_the_tuner_prices_plans_on_the_layers_node_size(pool):
    W = pool.world_size
    # W = 4: two nodes of two ranks; W = 2: one node holds both, the preset's node size stays
    want = 2 if W == 4 else PRESETS["cpu-gloo"].gpus_per_node
    assert pool.run(tuner_node_size_worker) == [want] * W


def disagreeing_plan_worker() -> str:
    layer = MoELayer(M, H, 2, seed=1)
    plan = Plan(r=1, d=1 + dist.get_rank())  # every rank asks for a different d
    try:
        layer(torch.randn(4, M), plan=plan)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.timeout(60)
def test_ranks_disagreeing_on_the_plan_fail_fast_with_a_clear_error(pool):
    for message in pool.run(disagreeing_plan_worker):
        assert "plan.d" in message


def raising_rank_worker() -> None:
    layer = MoELayer(M, H, 2, seed=1)
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 broke inside the layer")
    layer(torch.randn(4, M))


@pytest.mark.timeout(120)
def test_a_rank_that_raises_makes_the_others_fail_within_the_timeout():
    with (
        DistributedPool(2, collective_timeout_s=5.0, timeout_s=60.0) as small,
        pytest.raises(Exception, match="rank 1 broke") as failure,
    ):
        small.run(raising_rank_worker)
    assert "failed on ranks [0, 1]" in str(failure.value)  # rank 0 timed out instead of hanging


def test_bad_world_layouts_raise_value_errors():
    from flexmoe.core.layout import ExpertLayout

    with pytest.raises(ValueError, match="num_experts"):
        ExpertLayout(num_experts=6, model_dim=8, hidden_dim=8, world_size=4)
    with pytest.raises(ValueError, match="world size"):
        ExpertLayout(num_experts=3, model_dim=8, hidden_dim=8, world_size=4)
    with pytest.raises(ValueError, match="hidden_dim"):
        ExpertLayout(num_experts=1, model_dim=8, hidden_dim=6, world_size=4)
    with pytest.raises(ValueError, match="model_dim"):
        ExpertLayout(num_experts=1, model_dim=6, hidden_dim=8, world_size=4)


def adaptive_worker(steps: int) -> dict:
    """The tuner explores, then every rank settles on the same plan; outputs never depend on it."""
    W, rank = dist.get_world_size(), dist.get_rank()
    tuner = TunerConfig(min_trials=1, max_trials=1)  # decides after 3 rounds
    adaptive = MoELayer(M, H, 2, top_k=2, seed=4, dtype=torch.float64, tuner=tuner).double()
    fixed = MoELayer(M, H, 2, top_k=2, seed=4, dtype=torch.float64, tuner=False).double()
    sources, max_error = [], 0.0
    for step in range(steps):
        x, probe = _inputs({"seed": step, "tokens": [16] * W}, rank)
        x.requires_grad_(True)
        y = adaptive(x)
        (y * probe).sum().backward()
        sources.append(adaptive.last_plan.source)
        max_error = max(max_error, (y - fixed(x)).abs().max().item())
    return {
        "sources": sources,
        "decisions": adaptive.tuner.decisions,
        "table": adaptive.tuner.table(),
        "max_error": max_error,
    }


@pytest.mark.timeout(120)
def test_tuner_explores_then_all_ranks_pick_the_same_plan(pool):
    results = pool.run(adaptive_worker, 16)
    first = results[0]
    assert "tuner-explore" in first["sources"] and first["sources"][-1] == "tuner"
    assert len(first["decisions"]) == 1
    explored = first["decisions"][0]["explore_steps"]
    assert explored <= 4 * 2  # bounded: a cold and a warm round of at most 4 candidates
    assert sum(row["trials"] for row in first["table"]) == explored // 2  # cold trials discarded
    for res in results:
        assert res["decisions"][0]["plan"] == first["decisions"][0]["plan"]
        assert res["sources"] == first["sources"]
        assert res["max_error"] < 1e-9
