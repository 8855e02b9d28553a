"""Training of the `flexmoe lm` example: one process per rank (run by `flexmoe lm` under torchrun,
or called as `train(LMConfig(...))` inside an initialised process group, or on one process).

Every rank builds the same model from the same seed, `shard_experts` keeps 1/W of the experts per
rank, `wrap_data_parallel` averages the rest; each rank trains on its own random windows of the
corpus. Reported losses are LM cross-entropy in nats per byte (the router's aux loss excluded).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from flexmoe.app import cli_args
from flexmoe.app.progress import start_progress
from flexmoe.app.reporting import tuner_report
from flexmoe.lm.data import VOCAB, ByteCorpus
from flexmoe.parallel.data_parallel import clip_grad_norm, fully_shard_model, unwrap, wrap_data_parallel


def _option(default: object, describe: str):
    """A field that is also a `flexmoe lm` option; `describe` is its --help line."""
    return field(default=default, metadata={"help": describe})


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    steps: int = _option(300, "optimizer steps")
    batch_size: int = _option(16, "windows per rank and step")
    seq_len: int = _option(128, "bytes per window")
    lr: float = _option(3e-3, "peak learning rate (AdamW; linear warm-up, then cosine to a tenth)")
    warmup_steps: int = _option(20, "steps of linear warm-up")
    hidden_size: int = _option(128, "model width")
    layers: int = _option(2, "decoder layers, each with an MoE block")
    heads: int = _option(4, "attention heads (must divide --hidden-size)")
    experts: int = _option(8, "experts per MoE block, sharded over the ranks")
    top_k: int = _option(2, "experts per token")
    moe_intermediate_size: int = _option(128, "hidden size of one expert")
    aux_loss_coef: float = _option(0.01, "weight of the router's load-balancing loss")
    eval_every: int = _option(50, "steps between two held-out evaluations")
    eval_windows: int = _option(32, "held-out windows per evaluation")
    seed: int = _option(0, "seed of the weights and the batches")
    max_bytes: int | None = _option(None, "cap on the training bytes (default: the whole corpus)")
    out_dir: str = _option("runs/lm", "where metrics.json and loss.png go")
    # a bool is a flag that turns its default over; its help names the flag
    progress: bool = _option(True, "--no-progress: print only the evaluations, no progress bar or lines")
    fsdp: bool = _option(False, "--fsdp: FSDP2 for the dense parameters instead of DDP (experts are sharded)")
    hf_ep: bool = _option(
        False,
        '--hf-ep: transformers\' DistributedConfig (its EP over every rank, FSDP2) with the "flexmoe" EP '
        "implementation, instead of shard_experts and DDP (or --fsdp)",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type != "int":
                continue
            least = 0 if f.name in ("warmup_steps", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{f.name} must be an integer >= {least}, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} must not exceed experts={self.experts}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by heads={self.heads}")
        if self.fsdp and self.hf_ep:
            raise ValueError("fsdp and hf_ep are exclusive: hf_ep applies transformers' own FSDP2")
        if self.max_bytes is not None and self.max_bytes <= self.seq_len:
            raise ValueError(f"max_bytes must exceed seq_len={self.seq_len}, got {self.max_bytes}")


def dense_width(config: LMConfig) -> int:
    """The MLP width of the dense twin: as many hidden units per token as the MoE block activates."""
    return config.top_k * config.moe_intermediate_size


def build_model(config: LMConfig, *, dense: bool = False):
    """The Qwen3-MoE of `config`; dense: its twin, the same class with every MoE block replaced by a
    dense MLP of `dense_width` (Qwen3-MoE's `mlp_only_layers`), so embeddings and attention match."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import flexmoe.integrations.transformers  # noqa: F401  (registers "flexmoe")

    cfg = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=VOCAB,
        hidden_size=config.hidden_size,
        intermediate_size=dense_width(config),  # used by the dense MLPs only
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.experts,
        num_experts_per_tok=config.top_k,
        norm_topk_prob=True,
        num_hidden_layers=config.layers,
        mlp_only_layers=list(range(config.layers)) if dense else [],
        num_attention_heads=config.heads,
        num_key_value_heads=max(1, config.heads // 2),
        head_dim=config.hidden_size // config.heads,
        max_position_embeddings=max(512, config.seq_len),
        output_router_logits=config.aux_loss_coef > 0 and not dense,
        router_aux_loss_coef=config.aux_loss_coef,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(config.seed)  # the same weights on every rank
    if dense:
        return AutoModelForCausalLM.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="flexmoe")


def _lm_loss(out, config: LMConfig) -> torch.Tensor:
    aux = getattr(out, "aux_loss", None)
    return out.loss if aux is None else out.loss - config.aux_loss_coef * aux


def _mean_over_ranks(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return (t / world).tolist()


@torch.no_grad()
def evaluate(model, corpus: ByteCorpus, config: LMConfig, rank: int, world: int) -> float:
    """Mean held-out loss over the same windows on every run; rank r takes windows r, r + W, ..."""
    windows = corpus.windows(
        "held_out", config.eval_windows, config.seq_len, torch.Generator().manual_seed(1234)
    )
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for ids in windows[rank::world].split(config.batch_size):
        total[0] += float(_lm_loss(model(ids, labels=ids), config).detach()) * ids.shape[0]
        total[1] += ids.shape[0]
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def _lr_at(step: int, config: LMConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model, corpus: ByteCorpus, config: LMConfig, *, label: str = "flexmoe lm") -> dict:
    """Train `model` (wrapped for data parallelism or not) for config.steps steps, evaluating every
    config.eval_every; returns {"steps", "evals", "train_seconds", "seconds"}. "train_seconds" (also on
    every evaluation, so far) counts the training steps only, not the evaluations."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    history, evals, train_seconds = [], [], 0.0
    progress = start_progress(config.steps, label, enabled=config.progress and rank == 0)
    started = time.perf_counter()
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1009 + rank)
        ids = corpus.windows("train", config.batch_size, config.seq_len, gen)
        step_started = time.perf_counter()
        out = model(ids, labels=ids)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip_grad_norm(unwrap(model), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - step_started
        (loss,) = _mean_over_ranks([float(_lm_loss(out, config).detach())], world)
        history.append({"step": step + 1, "loss": loss})
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            held_out = evaluate(unwrap(model), corpus, config, rank, world)
            evals.append({"step": step + 1, "held_out_loss": held_out, "train_seconds": train_seconds})
        progress.set_postfix(
            loss=f"{loss:.3f}", held_out=f"{evals[-1]['held_out_loss']:.3f}" if evals else "-"
        )
        progress.update(1)
        if rank == 0 and not config.progress and (step + 1) % config.eval_every == 0:
            print(f"step {step + 1}: loss {loss:.4f}, held-out {evals[-1]['held_out_loss']:.4f}", flush=True)
    progress.close()
    return {
        "steps": history,
        "evals": evals,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
    }


def train(config: LMConfig) -> dict:
    """Train; returns the metrics (every rank) and writes them (first rank) to config.out_dir."""
    from flexmoe.integrations.transformers import moe_experts_modules, shard_experts

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    corpus = ByteCorpus.from_stdlib(max_bytes=config.max_bytes)
    if config.hf_ep:
        model, layers = _distributed_config_model(config)
    else:
        model = shard_experts(build_model(config))
        layers = [m.flexmoe_layer for m in moe_experts_modules(model).values()]
        model = fully_shard_model(model) if config.fsdp else wrap_data_parallel(model)
    run = fit(model, corpus, config)
    metrics = {
        "final_held_out_loss": run["evals"][-1]["held_out_loss"],
        "unigram_loss": corpus.unigram_loss(),
        "seconds": run["seconds"],
        "world_size": world,
        "steps": run["steps"],
        "evals": run["evals"],
        "corpus": corpus.summary(),
        "tuner": tuner_report(layers),
        "config": asdict(config),
    }
    if rank == 0:
        _write(Path(config.out_dir), metrics)
    return metrics


def _distributed_config_model(config: LMConfig):
    """The model as transformers' DistributedConfig shards it (EP over every rank, FSDP2 on the rest),
    its MoE blocks exchanging tokens through the "flexmoe" EP implementation; and their MoELayers.
    transformers shards what it loads, so the first rank saves the seeded weights for it to load."""
    from flexmoe.integrations.transformers import ep_layers, load_expert_parallel

    if not dist.is_initialized():
        raise ValueError("hf_ep trains under torch.distributed: run it with --nproc 2 or more")
    init = Path(config.out_dir) / "init"
    if dist.get_rank() == 0:
        build_model(config).save_pretrained(init)
    dist.barrier()
    model = load_expert_parallel(init)
    return model, list(ep_layers(model).values())


def _write(out: Path, metrics: dict) -> None:
    from flexmoe.app.reporting import environment
    from flexmoe.json_file import write_json

    out.mkdir(parents=True, exist_ok=True)
    metrics["environment"] = environment()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the demo extra brings matplotlib; the metrics need nothing
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([h["step"] for h in metrics["steps"]], [h["loss"] for h in metrics["steps"]], label="train")
        ax.plot(
            [e["step"] for e in metrics["evals"]],
            [e["held_out_loss"] for e in metrics["evals"]],
            "o-",
            label="held-out",
        )
        ax.axhline(metrics["unigram_loss"], color="gray", linestyle="--", label="unigram baseline")
        ax.set(xlabel="step", ylabel="nats per byte", title="byte-level Qwen3-MoE on the Python stdlib")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        metrics["plots"] = [str(out / "loss.png")]
    write_json(out / "metrics.json", metrics)


# LMConfig field type -> the option's validator; the others are >= 1
NONNEGATIVE = ("warmup_steps", "seed")
VALIDATORS = {"float": cli_args.positive_float, "str": str}


def _validator(f: Field) -> Callable[[str], object]:
    if f.name in NONNEGATIVE:
        return cli_args.nonnegative_int
    if f.name == "aux_loss_coef":
        return cli_args.nonnegative_float
    return VALIDATORS.get(f.type, cli_args.positive_int)


def build_parser(prog: str = "flexmoe lm", description: str | None = __doc__) -> cli_args.ArgumentParser:
    """One option per LMConfig field; the `flexmoe lm` launcher adds --nproc to the same parser."""
    parser = cli_args.ArgumentParser(prog=prog, description=description)
    add_config_options(parser)
    return parser


def add_config_options(
    parser: cli_args.ArgumentParser, *, skip: tuple[str, ...] = (), defaults: dict | None = None
) -> None:
    """One option per LMConfig field but those in `skip`; `defaults` replaces some fields' defaults
    (`flexmoe compare lm` shares these options with its own defaults)."""
    defaults = defaults or {}
    for f in fields(LMConfig):
        if f.name in skip:
            continue
        if f.type == "bool":
            flag, _, describe = f.metadata["help"].partition(": ")
            action = "store_false" if flag.startswith("--no-") else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=describe)
            continue
        default = defaults.get(f.name, f.default)
        help_line = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        option = f"--{f.name.replace('_', '-')}"
        parser.add_argument(option, type=_validator(f), default=default, help=help_line)


def config_from_args(parser: cli_args.ArgumentParser, args: argparse.Namespace) -> LMConfig:
    """The LMConfig of parsed options; a combination LMConfig refuses is the parser's one-line error."""
    names = {f.name for f in fields(LMConfig)}
    try:
        return LMConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as exc:
        parser.error(_as_options(str(exc), names))


def _as_options(message: str, names: set[str]) -> str:
    """LMConfig's messages name fields ("top_k=3 must not exceed experts=2"); say the options."""
    return re.sub(r"\b[a-z_]+\b", lambda m: _option_name(m.group(0), names), message)


def _option_name(word: str, names: set[str]) -> str:
    return f"--{word.replace('_', '-')}" if word in names else word


def parse_args(argv: list[str] | None = None) -> LMConfig:
    parser = build_parser()
    return config_from_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    from flexmoe.app.launch import init_distributed

    config = parse_args(argv)
    rank, _, _ = init_distributed()
    metrics = train(config)
    if rank == 0:
        print(
            f"held_out_loss={metrics['final_held_out_loss']:.4f} unigram_loss={metrics['unigram_loss']:.4f} "
            f"(nats per byte) wrote {config.out_dir}/metrics.json",
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
