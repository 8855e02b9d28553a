"""Sharded checkpoints: round trips, atomic replacement, clear errors, and loading at another W.

The multi-process tests save on W gloo ranks and load on W' (1 here in the pytest process, 2 or 4 in
a pool) and check the outputs, the re-sliced parameters and the re-sliced optimizer state. Layers are
dropless (capacity_factor=0) so routing does not depend on which tokens share a batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoELayer
from flexmoe.checkpoint import expert_file, load_checkpoint, save_checkpoint
from flexmoe.checkpoint import files as checkpoint_files
from flexmoe.checkpoint.reslice import rebuild_shard
from flexmoe.core.experts import EXPERT_PARAM_NAMES, init_full_expert
from flexmoe.core.layout import ExpertLayout
from flexmoe.testing.distributed import DistributedPool

M, H = 8, 16


class Net(nn.Module):
    """A Linear and two MoE layers: moe1 (E experts, gelu) and moe2 (2 experts, swiglu)."""

    def __init__(
        self,
        E: int = 4,
        seed: int = 0,
        *,
        H1: int = H,
        act1: str = "gelu",
        bias2: bool = True,
        proj_bias: bool = True,
        head: bool = False,
    ):
        super().__init__()
        torch.manual_seed(seed)
        fixed = dict(capacity_factor=0.0, parallelism=1, pipeline_degree=1, all_to_all="flat", tuner=False)
        self.proj = nn.Linear(M, M, bias=proj_bias)
        self.moe1 = MoELayer(M, H1, E, top_k=min(2, E), activation=act1, seed=seed, **fixed)
        self.moe2 = MoELayer(M, H, 2, top_k=1, activation="swiglu", bias=bias2, seed=seed + 1, **fixed)
        if head:
            self.head = nn.Linear(M, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = x + self.moe1(x)
        return x + self.moe2(x)


def _x(seed: int, rank: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, M, generator=torch.Generator().manual_seed(1000 * seed + rank), dtype=torch.float64)


def _step(model, opt, xs, *, scheduler=None, sync_replicated: bool = False) -> None:
    """One optimizer step on the sum of the losses of xs (one batch per forward)."""
    loss = sum(model(x).pow(2).sum() for x in xs)
    loss.backward()
    if sync_replicated:  # expert shard grads already are the grads of the sum over ranks
        for p in model.parameters():
            if not getattr(p, "flexmoe_expert", False):
                dist.all_reduce(p.grad)
    opt.step()
    opt.zero_grad()
    if scheduler is not None:
        scheduler.step()


def _expert_items(model):
    for layer in ("moe1", "moe2"):
        experts = getattr(model, layer).experts
        for n in EXPERT_PARAM_NAMES:
            p = getattr(experts, n)
            if p is not None:
                yield f"{layer}.experts.{n}", layer, n, p


def _snapshot(model, opt) -> dict:
    """Parameters and expert optimizer state, detached (what the comparisons need)."""
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "state": {}}
    for full, _, _, p in _expert_items(model):
        out["state"][full] = {k: v.clone() for k, v in opt.state[p].items()}
    return out


def _outputs(model, xs) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(x) for x in xs]


def _full_from_shards(model, layer, per_rank_shards, W) -> dict:
    lay = getattr(model, layer).layout
    layout = ExpertLayout(
        num_experts=lay.num_experts,
        model_dim=M,
        hidden_dim=lay.hidden_dim,
        world_size=W,
        activation=lay.activation,
    )
    return layout.unshard(per_rank_shards)


def _trained(E: int, seed: int, *, steps: int = 2):
    model = Net(E, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(steps):
        _step(model, opt, [_x(seed + step, 0), _x(seed + step, 1)], scheduler=sched)
    return model, opt, sched


# -- single process ---------------------------------------------------------------------------------
def test_round_trip_restores_outputs_optimizer_and_scheduler(tmp_path):
    path = tmp_path / "ckpt"
    a, opt_a, sched_a = _trained(4, seed=1)
    extra = {"epoch": 3, "tag": "x", "t": torch.ones(2)}
    save_checkpoint(path, a, opt_a, scheduler=sched_a, step=2, extra=extra)
    assert sorted(os.listdir(path)) == ["experts-00000.pt", "meta.pt", "replicated.pt"]

    b = Net(4, seed=2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1.0)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    xs = [_x(9, 0), _x(9, 1)]
    assert not torch.allclose(_outputs(a, xs)[0], _outputs(b, xs)[0])
    info = load_checkpoint(path, b, opt_b, scheduler=sched_b)
    assert info["step"] == 2 and info["world_size"] == 1
    assert (
        info["extra"].keys() == extra.keys() and info["extra"]["epoch"] == 3 and info["extra"]["tag"] == "x"
    )
    assert torch.equal(info["extra"]["t"], extra["t"])
    for ya, yb in zip(_outputs(a, xs), _outputs(b, xs), strict=True):
        assert torch.equal(ya, yb)
    assert sched_b.get_last_lr() == sched_a.get_last_lr()

    a.train()
    b.train()
    _step(a, opt_a, xs, scheduler=sched_a)
    _step(b, opt_b, xs, scheduler=sched_b)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    assert sched_b.get_last_lr() == sched_a.get_last_lr()


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model lives in `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_wrapped_model_saves_names_without_prefix(tmp_path):
    a, opt_a, _ = _trained(2, seed=3, steps=1)
    save_checkpoint(tmp_path / "c", Wrapper(a), opt_a)
    meta = torch.load(tmp_path / "c" / "meta.pt", weights_only=True)
    assert set(meta["experts"]) == {"moe1.experts", "moe2.experts"}
    assert "proj.weight" in meta["replicated"]
    assert not any(k.startswith("module.") for k in meta["replicated"])
    b = Net(2, seed=4)
    opt_b = torch.optim.AdamW(b.parameters())
    load_checkpoint(tmp_path / "c", b, opt_b)
    c = Net(2, seed=5)
    load_checkpoint(tmp_path / "c", Wrapper(c))
    xs = [_x(1, 0)]
    assert torch.equal(_outputs(a, xs)[0], _outputs(b, xs)[0])
    assert torch.equal(_outputs(a, xs)[0], _outputs(c, xs)[0])


@pytest.mark.parametrize(
    ("E", "W_saved", "W_loaded", "activation"),
    [
        (4, 2, 4, "gelu"),
        (4, 4, 1, "swiglu"),
        (1, 2, 4, "swiglu"),
        (2, 4, 2, "gelu"),
        (1, 4, 2, "swiglu"),
        (2, 1, 4, "relu"),
        (8, 2, 4, "swiglu"),
        (2, 8, 4, "swiglu"),
    ],
)
def test_reslicing_matches_the_layout_of_the_full_experts(E, W_saved, W_loaded, activation):
    full_parts = [
        init_full_expert(e, seed=7, model_dim=M, hidden_dim=H, activation=activation) for e in range(E)
    ]
    full = {k: torch.stack([p[k] for p in full_parts]) for k in EXPERT_PARAM_NAMES}

    def layout(W, rank=0):
        return ExpertLayout(
            num_experts=E, model_dim=M, hidden_dim=H, world_size=W, rank=rank, activation=activation
        )

    saved = [layout(W_saved, r).shard(full) for r in range(W_saved)]
    for rank in range(W_loaded):
        want = layout(W_loaded, rank).shard(full)
        for name in EXPERT_PARAM_NAMES:
            fetch = lambda r, n=name: saved[r][n]  # noqa: E731
            got = rebuild_shard(layout(W_loaded, rank), layout(W_saved), name, fetch)
            assert torch.equal(got, want[name]), (name, rank)


# -- atomicity --------------------------------------------------------------------------------------
def test_save_replaces_an_older_checkpoint_and_a_stale_temp_dir(tmp_path):
    path = tmp_path / "ckpt"
    a, b = Net(2, seed=1), Net(2, seed=2)
    save_checkpoint(path, a)
    stale = tmp_path / ".ckpt.tmp"
    stale.mkdir()
    (stale / "junk").write_text("half-written")
    save_checkpoint(path, b, step=5)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    c = Net(2, seed=3)
    assert load_checkpoint(path, c)["step"] == 5
    assert torch.equal(_outputs(b, [_x(0, 0)])[0], _outputs(c, [_x(0, 0)])[0])


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    a = Net(2, seed=1)
    save_checkpoint(path, a, step=1)
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(path, Net(2, seed=2), extra={"f": lambda: 0})

    real_write = checkpoint_files.write

    def failing_write(obj, file):
        if file.name == checkpoint_files.REPLICATED_FILE:
            raise OSError("disk full")
        real_write(obj, file)

    monkeypatch.setattr(checkpoint_files, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Net(2, seed=2), step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    c = Net(2, seed=3)
    assert load_checkpoint(path, c)["step"] == 1
    assert torch.equal(_outputs(a, [_x(0, 0)])[0], _outputs(c, [_x(0, 0)])[0])


def test_a_save_interrupted_between_its_renames_is_recovered(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, Net(2, seed=1), step=1)
    os.rename(path, tmp_path / ".ckpt.old")  # the old one moved aside, the new one never moved in
    assert load_checkpoint(path, Net(2, seed=2))["step"] == 1
    save_checkpoint(path, Net(2, seed=3), step=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert load_checkpoint(path, Net(2, seed=2))["step"] == 2


def test_save_refuses_to_replace_something_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="results"):
        save_checkpoint(path, Net(2, seed=1))
    assert (path / "precious.txt").read_text() == "keep me"


# -- errors -----------------------------------------------------------------------------------------
def test_bad_paths_raise_clear_errors(tmp_path):
    model = Net(2, seed=1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere", model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_checkpoint(tmp_path / "file", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.pt"):
        load_checkpoint(tmp_path / "empty", model)

    path = tmp_path / "ckpt"
    save_checkpoint(path, model)
    (path / expert_file(0)).unlink()
    with pytest.raises(FileNotFoundError, match="experts-00000.pt"):
        load_checkpoint(path, model)
    save_checkpoint(path, model)
    (path / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="meta.pt"):
        load_checkpoint(path, model)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(E=8), r"moe1\.experts\.fc1_weight.*\(4, 8, 16\).*\(8, 8, 16\)"),
        (dict(H1=32), r"moe1\.experts\.fc1_weight.*\(4, 8, 16\).*\(4, 8, 32\)"),
        (dict(act1="swiglu"), r"moe1\.experts\.fc1_weight.*activation 'gelu'.*'swiglu'"),
        (dict(bias2=False), r"moe2\.experts\.fc1_bias' is not in the model"),
        (dict(head=True), r"missing from the checkpoint: \['head\.bias', 'head\.weight'\]"),
        (dict(proj_bias=False), r"the model does not have: \['proj\.bias'\]"),
    ],
)
def test_mismatched_model_raises_and_changes_nothing(tmp_path, kwargs, pattern):
    save_checkpoint(tmp_path / "c", Net(4, seed=1))
    other = Net(**{"E": 4, "seed": 2, **kwargs})
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(tmp_path / "c", other)
    for n, p in other.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_mismatched_optimizer_raises(tmp_path):
    a, opt_a, _ = _trained(2, seed=1, steps=1)
    save_checkpoint(tmp_path / "with", a, opt_a)
    save_checkpoint(tmp_path / "without", a)
    b = Net(2, seed=2)
    with pytest.raises(ValueError, match=r"param group 0 differs.*moe1\.experts\.fc1_weight"):
        partial = torch.optim.AdamW([p for n, p in b.named_parameters() if "moe1" not in n])
        load_checkpoint(tmp_path / "with", b, partial)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "without", b, torch.optim.AdamW(b.parameters()))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        save_checkpoint(tmp_path / "bad", b, torch.optim.AdamW([nn.Parameter(torch.zeros(3))]))


# -- several processes ------------------------------------------------------------------------------
EVAL_SEED = 77


@pytest.fixture(scope="module")
def pool2():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=120.0) as pool:
        yield pool


def save_worker(root: str, E: int, seed: int) -> dict:
    """Train 2 steps on this rank's batches, save, and report outputs, shards and optimizer state."""
    rank = dist.get_rank()
    model = Net(E, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        _step(model, opt, [_x(seed + step, rank)], sync_replicated=True)
    save_checkpoint(os.path.join(root, f"E{E}"), model, opt, step=2, extra={"E": E})
    snap = _snapshot(model, opt)
    return {"y": _outputs(model, [_x(EVAL_SEED, rank)])[0], **snap}


def load_worker(root: str, E: int, xs: list[torch.Tensor]) -> dict:
    model = Net(E, seed=1234)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    info = load_checkpoint(os.path.join(root, f"E{E}"), model, opt)
    return {"info": info, "ys": _outputs(model, xs), **_snapshot(model, opt)}


def train_after_load_worker(root: str, seed: int) -> dict:
    """Load a one-process checkpoint on this rank, report outputs, then take one more step."""
    rank = dist.get_rank()
    model = Net(1, seed=4321)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_checkpoint(root, model, opt)
    ys = _outputs(model, [_x(EVAL_SEED, rank)])
    snap = _snapshot(model, opt)
    model.train()
    _step(model, opt, [_x(seed + 2, rank)], sync_replicated=True)
    return {"ys": ys, "loaded": snap, "after": _snapshot(model, opt)}


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory, pool2):
    """Checkpoints saved on 2 ranks with E=4 (2 experts per rank) and E=1 (s=2: hidden columns)."""
    root = str(tmp_path_factory.mktemp("two_ranks"))
    results = {E: pool2.run(save_worker, root, E, 10 + E) for E in (4, 1)}
    return root, results


def _full_states(model, per_rank: list[dict], W: int) -> dict:
    """The unsharded parameters and AdamW moments of every expert tensor, from the ranks' snapshots."""
    full = {}
    for layer in ("moe1", "moe2"):
        prefix = f"{layer}.experts."
        for what in ("params", "exp_avg", "exp_avg_sq"):
            shards = []
            for res in per_rank:
                if what == "params":
                    shards.append({n: res["params"][prefix + n] for n in EXPERT_PARAM_NAMES})
                else:
                    shards.append({n: res["state"][prefix + n][what] for n in EXPERT_PARAM_NAMES})
            for n, t in _full_from_shards(model, layer, shards, W).items():
                full[(prefix + n, what)] = t
    return full


def _shard_of(full: dict, model, full_name: str, what: str, W: int, rank: int) -> torch.Tensor:
    layer, _, n = full_name.split(".")
    lay = getattr(model, layer).layout
    layout = ExpertLayout(
        num_experts=lay.num_experts,
        model_dim=M,
        hidden_dim=lay.hidden_dim,
        world_size=W,
        rank=rank,
        activation=lay.activation,
    )
    prefix = f"{layer}.experts."
    return layout.shard({k: full[(prefix + k, what)] for k in EXPERT_PARAM_NAMES})[n]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("E", [4, 1])
def test_two_rank_checkpoint_loads_on_one_process(saved_on_two, E):
    root, results = saved_on_two
    per_rank = results[E]
    model = Net(E, seed=999)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    info = load_checkpoint(os.path.join(root, f"E{E}"), model, opt)
    assert info == {"step": 2, "extra": {"E": E}, "world_size": 2}
    ys = _outputs(model, [_x(EVAL_SEED, r) for r in range(2)])
    for r in range(2):
        torch.testing.assert_close(ys[r], per_rank[r]["y"], rtol=0, atol=1e-10)
    full = _full_states(model, per_rank, W=2)
    for full_name, _, _, p in _expert_items(model):
        assert torch.equal(p.detach(), full[(full_name, "params")]), full_name
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], full[(full_name, key)]), (full_name, key)
        assert float(state["step"]) == 2.0
    for name, p in model.named_parameters():  # replicated: the first rank's
        if not getattr(p, "flexmoe_expert", False):
            assert torch.equal(p.detach(), per_rank[0]["params"][name]), name


@pytest.mark.timeout(240)
def test_two_rank_checkpoint_loads_on_four_ranks(saved_on_two):
    root, results = saved_on_two
    xs = [_x(EVAL_SEED, r) for r in range(2)]
    with DistributedPool(4, collective_timeout_s=30.0, timeout_s=180.0) as pool:
        loaded = {E: pool.run(load_worker, root, E, xs) for E in (4, 1)}
    for E in (4, 1):
        reference = Net(E, seed=0)
        full = _full_states(reference, results[E], W=2)
        for rank, res in enumerate(loaded[E]):
            assert res["info"]["step"] == 2 and res["info"]["world_size"] == 2
            for r in range(2):
                torch.testing.assert_close(res["ys"][r], results[E][r]["y"], rtol=0, atol=1e-10)
            for full_name, _, _, _ in _expert_items(reference):
                want = _shard_of(full, reference, full_name, "params", 4, rank)
                assert torch.equal(res["params"][full_name], want), (E, rank, full_name)
                got = res["state"][full_name]
                for key in ("exp_avg", "exp_avg_sq"):
                    want = _shard_of(full, reference, full_name, key, 4, rank)
                    assert torch.equal(got[key], want), (E, rank, full_name, key)
                assert float(got["step"]) == 2.0


@pytest.mark.timeout(180)
def test_one_process_checkpoint_loads_on_two_ranks_and_trains_on(tmp_path, pool2):
    seed = 21
    model = Net(1, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        _step(model, opt, [_x(seed + step, r) for r in range(2)])
    save_checkpoint(tmp_path / "single", model, opt, step=2)
    ys = _outputs(model, [_x(EVAL_SEED, r) for r in range(2)])
    loaded_full = _snapshot(model, opt)
    model.train()
    _step(model, opt, [_x(seed + 2, r) for r in range(2)])  # the step the two ranks take together
    after_full = _snapshot(model, opt)

    per_rank = pool2.run(train_after_load_worker, str(tmp_path / "single"), seed)

    def full_of(snap):
        return {
            (n, w): (snap["params"][n] if w == "params" else snap["state"][n][w])
            for n, _, _, _ in _expert_items(model)
            for w in ("params", "exp_avg", "exp_avg_sq")
        }

    for rank, res in enumerate(per_rank):
        torch.testing.assert_close(res["ys"][0], ys[rank], rtol=0, atol=1e-10)
        for snap_name, full_snap, atol in (("loaded", loaded_full, 0.0), ("after", after_full, 1e-10)):
            full = full_of(full_snap)
            got = res[snap_name]
            for full_name, _, _, _ in _expert_items(model):
                want = _shard_of(full, model, full_name, "params", 2, rank)
                torch.testing.assert_close(got["params"][full_name], want, rtol=0, atol=atol)
                for key in ("exp_avg", "exp_avg_sq"):
                    want = _shard_of(full, model, full_name, key, 2, rank)
                    torch.testing.assert_close(got["state"][full_name][key], want, rtol=0, atol=atol)
            for name, p in full_snap["params"].items():
                if "experts" not in name:
                    torch.testing.assert_close(got["params"][name], p, rtol=0, atol=atol, msg=name)


def failing_worker(root: str) -> dict:
    """Errors on one rank reach every rank, and a load that fails anywhere changes nothing anywhere."""
    rank = dist.get_rank()
    out = {}
    try:  # only the first rank's `extra` is saved, and it cannot be loaded with weights_only
        save_checkpoint(os.path.join(root, "bad"), Net(2, seed=1), extra={"f": print} if rank == 0 else None)
    except ValueError as exc:
        out["save"] = str(exc)
    out["bad_exists"] = os.path.exists(os.path.join(root, "bad"))
    model = Net(4, seed=5)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    path = os.path.join(root, "E4" if rank == 0 else "missing")
    try:
        load_checkpoint(path, model)
    except FileNotFoundError as exc:
        out["load"] = str(exc)
    out["unchanged"] = all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    return out


@pytest.mark.timeout(120)
def test_an_error_on_one_rank_is_raised_on_every_rank(saved_on_two, pool2):
    root, _ = saved_on_two
    r0, r1 = pool2.run(failing_worker, root)
    assert "extra" in r0["save"] and r1["save"].startswith("rank 0:") and "extra" in r1["save"]
    assert not r0["bad_exists"] and not r1["bad_exists"]
    assert "missing" in r1["load"] and r0["load"].startswith("rank 1:") and "missing" in r0["load"]
    assert r0["unchanged"] and r1["unchanged"]
