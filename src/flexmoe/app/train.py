"""`flexmoe train`: SwinV2-MoE image classification, one process or many (launch with torchrun).

Data-parallel over the ranks for the replicated parameters (DDP), expert parallel for the experts
(the MoE layers run whatever plan the tuner picks), global-norm gradient clipping, AdamW with the
usual no-decay set, linear warm-up + cosine schedule, evaluation every epoch, sharded checkpoints
(resume with --resume), metrics JSON and plots written by the first rank.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flexmoe.app import cli_args
from flexmoe.app.data import DataSplit, load_split
from flexmoe.app.launch import init_distributed
from flexmoe.app.progress import start_progress
from flexmoe.app.reporting import EpochLog, write_report
from flexmoe.checkpoint import load_checkpoint, read_extra, save_checkpoint
from flexmoe.core.config import check_positive_int
from flexmoe.cpu_memory import retain_freed_memory
from flexmoe.json_file import write_json
from flexmoe.models import create_model, list_models
from flexmoe.parallel.data_parallel import clip_grad_norm, fully_shard_model, unwrap, wrap_data_parallel
from flexmoe.tuning.plan_table import apply_plan_table, export_plan_table

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # --precision -> autocast dtype
NO_DECAY_MARKERS = ("cpb", "logit_scale", "temperature", "norm", "bias", "position")
# settings a resumed run must share with the checkpoint: they decide the data split, the batches and
# the schedule, so a change would silently train on something else
RESUME_MUST_MATCH = (
    "model",
    "data",
    "test_fraction",
    "limit",
    "seed",
    "batch_size",
    "epochs",
    "max_steps_per_epoch",
    "model_overrides",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str = "swinv2_moe_tiny"
    data: str = "mnist_5k"
    test_fraction: float = 0.2
    limit: int | None = None  # keep about this many images (quick runs)
    epochs: int = 4
    batch_size: int = 64  # per rank
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    shift_augment: int = 2  # random translation by up to this many pixels
    seed: int = 0
    out_dir: str = "runs/train"
    resume: bool = False
    stop_after: int | None = None  # train only this many epochs in this run (continue with --resume)
    max_steps_per_epoch: int | None = None
    # on CPU, keep freed host memory for the next step (flexmoe.cpu_memory); False leaves malloc as it is
    retain_cpu_memory: bool = True
    # "bf16": forward and loss under torch.autocast(bfloat16) on the device in use, fp32 master weights
    # (the MoE layers keep their gate and routing in fp32); "fp32": no autocast
    precision: str = "fp32"
    plan_table: str | None = None  # a plan file (`flexmoe tune`): the tuners start from its buckets
    # FSDP2 (fully_shard_model) for the dense parameters instead of DDP; the experts are sharded anyway
    fsdp: bool = False
    model_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "stop_after", "max_steps_per_epoch"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 2):
            raise ValueError(f"limit must be an integer >= 2, got {self.limit!r}")
        checks = {
            "lr": (lambda v: v > 0, "> 0"),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "warmup_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "grad_clip": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
            "label_smoothing": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "test_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
        }
        for name, (accept, what) in checks.items():
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or not accept(value):
                raise ValueError(f"{name} must be a number {what}, got {value!r}")
        if not isinstance(self.shift_augment, int) or self.shift_augment < 0:
            raise ValueError(f"shift_augment must be an integer >= 0, got {self.shift_augment!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")

    def autocast(self, device: torch.device):
        """The precision context of forward and loss (backward and optimizer run outside it)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or any(marker in name for marker in NO_DECAY_MARKERS)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def random_shift(x_BCHW: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate every image by up to `pixels` in each direction (background-filled)."""
    if pixels == 0:
        return x_BCHW
    B, _, H, W = x_BCHW.shape
    padded = F.pad(x_BCHW, (pixels,) * 4, value=float(x_BCHW.min()) if x_BCHW.numel() else 0.0)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, B), generator=generator).tolist()
    return torch.stack([padded[b, :, dy[b] : dy[b] + H, dx[b] : dx[b] + W] for b in range(B)])


def _rank_batches(n: int, batch: int, rank: int, world: int, epoch: int, seed: int, cap: int | None):
    """Every rank gets the same number of batches (collectives inside the MoE layers need it)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    steps = n // (batch * world)
    if cap is not None:
        steps = min(steps, cap)
    return [order[(s * world + rank) * batch : (s * world + rank + 1) * batch] for s in range(steps)]


def evaluate(model, split: DataSplit, *, batch: int, rank: int, world: int, device) -> tuple[float, float]:
    """(accuracy, mean loss) over the whole test set, every rank evaluating an equal share."""
    model.eval()
    n = len(split.test)
    per_rank = math.ceil(n / world)
    # equal shares (the MoE layers' collectives need the same number of forwards everywhere): the last
    # share is padded with image 0, counted with weight 0
    index = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    weight = (index < n).double().to(device)
    index = torch.where(index < n, index, torch.zeros_like(index))
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, per_rank, batch):
            idx, w = index[start : start + batch], weight[start : start + batch]
            x, y = split.test.images[idx].to(device), split.test.labels[idx].to(device)
            logits = model(x)
            stats[0] += ((logits.argmax(-1) == y).double() * w).sum()
            stats[1] += (F.cross_entropy(logits.double(), y, reduction="none") * w).sum()
            stats[2] += w.sum()
    if world > 1:
        dist.all_reduce(stats)
    model.train()
    return float(stats[0] / stats[2]), float(stats[1] / stats[2])


def _train_epoch(model, optimizer, schedule, split, batches, config, augment, device, progress):
    """One epoch of steps; returns (summed loss, images, seconds, per-layer expert demand)."""
    loss_sum, images, started = 0.0, 0, time.perf_counter()
    load = [torch.zeros(layer.config.num_experts) for layer in moe_layers(model)]
    for index in batches:
        x = random_shift(split.train.images[index], config.shift_augment, augment).to(device)
        y = split.train.labels[index].to(device)
        with config.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            loss = loss + unwrap(model).aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model, config.grad_clip)
        optimizer.step()
        schedule.step()
        loss_sum += loss.item() * len(index)
        images += len(index)
        for i, layer in enumerate(moe_layers(model)):
            load[i] += layer.last_routing.demand_E.float().cpu()
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    return loss_sum, images, time.perf_counter() - started, load


def _rng_states(augment: torch.Generator, world: int) -> list[dict]:
    """Every rank's random state (gate noise, dropout, augmentation), so a resumed run continues
    exactly where the saved one stopped."""
    mine = {"torch": torch.get_rng_state(), "augment": augment.get_state()}
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def _restore_rng(states: list[dict], rank: int, augment: torch.Generator) -> None:
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"])
        augment.set_state(states[rank]["augment"])


def moe_layers(model) -> list:
    inner = unwrap(model)
    return inner.moe_layers() if hasattr(inner, "moe_layers") else []


@dataclass(frozen=True)
class _Run:
    """Who this process is in the run and where the run writes."""

    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path

    @property
    def show(self) -> bool:
        """The first rank prints, and writes the report and the plan table."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def batches(self, n: int, epoch: int) -> list[torch.Tensor]:
        c = self.config
        return _rank_batches(n, c.batch_size, self.rank, self.world, epoch, c.seed, c.max_steps_per_epoch)


@dataclass(frozen=True)
class _Training:
    """The model and what steps it: built once, then changed in place by every step."""

    model: torch.nn.Module  # wrapped for data parallelism (see unwrap)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int


def train(config: TrainConfig) -> dict:
    """Train, evaluate every epoch and checkpoint; returns the report (what metrics.json holds)."""
    run = _start(config)
    split = load_split(config.data, test_fraction=config.test_fraction, seed=config.seed, limit=config.limit)
    model = _build_model(run, split)
    training = _build_optimizer(run, model, len(split.train))
    # one stream per rank, so the ranks shift their images differently
    augment = torch.Generator().manual_seed(config.seed * 7 + run.rank)
    start_epoch, history = _resume(run, training, augment) if config.resume else (0, [])
    _run_epochs(run, training, split, augment, history, start_epoch)
    return _finish(run, training.model, history)


def _start(config: TrainConfig) -> _Run:
    rank, world, device = init_distributed()
    if device.type == "cpu" and config.retain_cpu_memory:
        retain_freed_memory()
    torch.manual_seed(config.seed)  # identical replicated parameters on every rank
    return _Run(config=config, rank=rank, world=world, device=device, out=Path(config.out_dir))


def _model_shape(split: DataSplit) -> dict:
    """The model settings the data decides (stored in the checkpoint to rebuild the model)."""
    C, H, _ = split.image_shape
    return dict(img_size=H, in_chans=C, num_classes=split.num_classes)


def _build_model(run: _Run, split: DataSplit) -> torch.nn.Module:
    config = run.config
    model = create_model(config.model, **_model_shape(split), **config.model_overrides).to(run.device)
    if config.plan_table is not None:
        notes = apply_plan_table(model, config.plan_table)
        if run.show:
            print(f"plan table {config.plan_table}: {notes}", flush=True)
    return fully_shard_model(model) if config.fsdp else wrap_data_parallel(model)


def _build_optimizer(run: _Run, model: torch.nn.Module, n_train: int) -> _Training:
    """AdamW and the warm-up + cosine schedule over every epoch's steps (epoch 0 sizes them all)."""
    config = run.config
    optimizer = torch.optim.AdamW(param_groups(unwrap(model), config.weight_decay), lr=config.lr)
    steps_per_epoch = len(run.batches(n_train, 0))
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} x {run.world} ranks exceeds the {n_train} training images"
        )
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, max(1, int(config.warmup_fraction * total)))
    )
    return _Training(model=model, optimizer=optimizer, schedule=schedule, steps_per_epoch=steps_per_epoch)


def _resume(run: _Run, training: _Training, augment: torch.Generator) -> tuple[int, list[EpochLog]]:
    """(first epoch to run, the epochs done) from the checkpoint, with every random state restored."""
    _check_resumable(run.config, run.checkpoint_dir)
    state = load_checkpoint(
        run.checkpoint_dir, unwrap(training.model), training.optimizer, scheduler=training.schedule
    )
    history = [EpochLog(**e) for e in state["extra"]["history"]]
    _restore_rng(state["extra"]["rng"], run.rank, augment)
    return state["extra"]["epoch"] + 1, history


def _run_epochs(
    run: _Run,
    training: _Training,
    split: DataSplit,
    augment: torch.Generator,
    history: list[EpochLog],
    start_epoch: int,
) -> None:
    """Train, evaluate, log and checkpoint each epoch of this run; appends to `history`."""
    config = run.config
    stop = config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    for epoch in range(start_epoch, stop):
        history.append(_epoch(run, training, split, augment, epoch))
        if run.show:
            h = history[-1]
            print(
                f"epoch {epoch + 1}: train_loss={h.train_loss:.4f} test_loss={h.test_loss:.4f} "
                f"test_accuracy={h.test_accuracy:.4f} images/s={h.images_per_s:.1f}",
                flush=True,
            )
        _save(run, training, split, augment, epoch, history)


def _epoch(
    run: _Run, training: _Training, split: DataSplit, augment: torch.Generator, epoch: int
) -> EpochLog:
    """One epoch of training, then the evaluation; the training loss is averaged over all ranks."""
    batches = run.batches(len(split.train), epoch)
    desc = f"epoch {epoch + 1}/{run.config.epochs}"
    bar = start_progress(len(batches), desc, enabled=run.show, leave=False)
    loss_sum, images, seconds, load = _train_epoch(
        training.model,
        training.optimizer,
        training.schedule,
        split,
        batches,
        run.config,
        augment,
        run.device,
        bar,
    )
    accuracy, test_loss = evaluate(
        training.model, split, batch=256, rank=run.rank, world=run.world, device=run.device
    )
    train_loss = torch.tensor([loss_sum, images], dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(train_loss)
    return EpochLog(
        epoch=epoch,
        train_loss=float(train_loss[0] / train_loss[1]),
        test_loss=test_loss,
        test_accuracy=accuracy,
        images_per_s=float(train_loss[1]) / seconds,
        seconds=seconds,
        expert_load=[(v / v.sum().clamp_min(1)).tolist() for v in load],
    )


def _save(
    run: _Run,
    training: _Training,
    split: DataSplit,
    augment: torch.Generator,
    epoch: int,
    history: list[EpochLog],
) -> None:
    """Checkpoint after `epoch`, with what a resumed run needs to continue exactly from here."""
    save_checkpoint(
        run.checkpoint_dir,
        unwrap(training.model),
        training.optimizer,
        scheduler=training.schedule,
        step=(epoch + 1) * training.steps_per_epoch,
        extra={
            "epoch": epoch,
            "history": [asdict(h) for h in history],
            "model_shape": _model_shape(split),
            "config": json.loads(json.dumps(asdict(run.config), default=str)),
            "rng": _rng_states(augment, run.world),  # a collective: every rank takes part
        },
    )


def _finish(run: _Run, model: torch.nn.Module, history: list[EpochLog]) -> dict:
    """The report (metrics.json, plots), the tuned plans (plan_table.json) and the final line."""
    result = write_report(
        run.out,
        config=asdict(run.config),
        history=history,
        layers=moe_layers(model),
        world_size=run.world,
        write=run.show,
    )
    tuned = export_plan_table(unwrap(model))  # no collective: the tuners' states are agreed plain data
    if run.show and tuned["layers"]:
        write_json(run.out / "plan_table.json", tuned)
    if run.show:
        print(f"test_accuracy={result['test_accuracy']:.4f}", flush=True)
    return result


def _check_resumable(config: TrainConfig, checkpoint_dir: Path) -> None:
    """A resumed run continues the saved one: the settings that decide its data and schedule match."""
    saved = read_extra(checkpoint_dir).get("config", {})
    mine = json.loads(json.dumps(asdict(config), default=str))
    differ = [name for name in RESUME_MUST_MATCH if name in saved and saved[name] != mine[name]]
    if differ:
        changes = ", ".join(
            f"--{n.replace('_', '-')} {mine[n]!r} (the checkpoint has {saved[n]!r})" for n in differ
        )
        raise ValueError(
            f"--resume: {changes}; these decide the data split, the batches and the schedule, so a resumed "
            "run must keep the checkpoint's values"
        )


def build_parser(prog: str = "flexmoe train", description: str | None = __doc__) -> cli_args.ArgumentParser:
    """The options of `flexmoe train`; `flexmoe demo` builds on the same parser."""
    defaults = TrainConfig()
    a = cli_args
    p = a.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", choices=list_models(), default=defaults.model)
    p.add_argument(
        "--data", default=defaults.data, help="mnist_5k | digits | a folder of class folders | .npz"
    )
    types = {
        "epochs": a.positive_int,
        "batch_size": a.positive_int,
        "seed": a.nonnegative_int,
        "shift_augment": a.nonnegative_int,
        "lr": a.positive_float,
        "weight_decay": a.nonnegative_float,
        "warmup_fraction": a.half_open_fraction,
        "grad_clip": a.nonnegative_float,
        "label_smoothing": a.unit_interval,
        "test_fraction": a.open_fraction,
    }
    for name, kind in types.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    p.add_argument("--limit", type=a.positive_int, default=None, help="keep about this many images (>= 2)")
    p.add_argument("--max-steps-per-epoch", type=a.positive_int, default=None)
    p.add_argument(
        "--stop-after", type=a.positive_int, default=None, help="epochs to run now; continue with --resume"
    )
    p.add_argument("--out-dir", default=defaults.out_dir)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=defaults.precision,
        help="bf16: forward and loss under torch.autocast(bfloat16), fp32 master weights",
    )
    p.add_argument(
        "--plan-table",
        default=None,
        metavar="FILE",
        help="a plan file from `flexmoe tune` (or a run's plan_table.json): known buckets are not explored",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2 for the dense parameters instead of DDP (the experts are sharded either way)",
    )
    p.add_argument(
        "--no-retain-cpu-memory",
        dest="retain_cpu_memory",
        action="store_false",
        help="let malloc return freed host memory to the OS (slower steps on CPU, smaller resident size)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a model config field, e.g. --set num_experts=4 --set gate='\"cosine\"'",
    )
    return p


def config_from_args(parser: cli_args.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed options (options the parser has beyond TrainConfig's are ignored)."""
    overrides = cli_args.parse_overrides(args.set)
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.limit is not None and args.limit < 2:
        parser.error(f"argument --limit: must be an integer >= 2, got {args.limit}")
    return TrainConfig(**values, model_overrides=overrides)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    return config_from_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    result = train(parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()
    return result
