"""The "flexmoe" EP implementation for transformers' EPImplementationInterface.

Legend: T tokens of this rank, k choices per token, E experts, L = E / W local experts, W ranks of
the EP group, M model dim, I expert hidden dim.

    model = AutoModelForCausalLM.from_pretrained(
        name, distributed_config=DistributedConfig(ep_size=W, fsdp_size=F, ep_implementation="flexmoe"))

transformers shards every experts module (Shard(0) on its EP mesh: L whole experts per rank, which
is flexmoe's own layout for E >= W), applies FSDP2 to the rest, and hands each MoE block's tokens,
with the model's routing (top_k_index [T, k] global ids, top_k_weights [T, k]), to this
implementation. It runs them through a flexmoe MoELayer without a gate over transformers' EP group:
capacity agreed across the group, flexmoe's plans (r = 1: the pipelined all-to-all, d chunks, flat
or 2DH, or each token once to each rank that holds any of its experts, "dedup"; r = 0: all-gather the
experts, no token moves) chosen by its run-time tuner, on the module's own parameters (HostExperts).
Gradients: an expert's is that of the sum of the group's losses, as under transformers' "all_to_all";
FSDP2 then divides it as it does for that one.

Limits: whole experts per rank only (transformers refuses E % W != 0, and so E < W, when it shards;
flexmoe's shard_experts splits an expert's hidden dim when E < W); tp_size == 1; the experts run in
flexmoe's grouped FFN whatever experts_implementation says: its fused activation where it computes
the module's (SwiGLU, or SiLU / ReLU / erf GELU without a gate), else the module's own code between
the GEMMs (a custom gate such as GPT-OSS's, through autograd: ops.expert_ffn.CustomActivation); a
norm after each expert is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn
from transformers.distributed.expert_parallel import EPImplementation, EPImplementationInterface

from flexmoe.integrations.transformers.backend import layout_activation
from flexmoe.integrations.transformers.host_experts import HostExperts
from flexmoe.integrations.transformers.module_weights import is_transposed
from flexmoe.layer import MoELayer

EP_NAME = "flexmoe"
# set from the model: routing, activation, biases, the group and where the parameters live
_FROM_THE_MODEL = ("gate", "activation", "bias", "group", "dtype", "device", "top_k", "build_experts")


class FlexMoEEP(EPImplementation):
    """One per experts module (transformers builds it when it applies the EP plan)."""

    # MoELayer settings, read-only; ep_implementation_class(**options) makes a subclass with others
    layer_options: Mapping[str, object] = MappingProxyType({})

    def __init__(self, experts: nn.Module, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        name = type(experts).__name__
        if tp_mesh.size() > 1:
            raise ValueError(
                f"ep_implementation='flexmoe' needs tp_size=1 (got {tp_mesh.size()}); use "
                "ep_implementation='all_to_all' with tensor parallelism"
            )
        if not getattr(experts, "_is_expert_parallel", False):
            raise ValueError(
                f"{name}: ep_implementation='flexmoe' needs experts sharded by transformers' EP plan"
            )
        activation = layout_activation(experts)  # the module's own code runs (HostExperts)
        W = ep_mesh.size()
        down = experts.down_proj  # global shape [E, M, I] ([E, I, M] transposed), a DTensor here
        M, I = (down.shape[2], down.shape[1]) if is_transposed(experts) else (down.shape[1], down.shape[2])
        E = self.num_local_experts * W
        top_k = getattr(experts.config, "num_experts_per_tok", None) or 1
        options = {"capacity_factor": 0.0, **self.layer_options}  # the router expects every choice served
        self.layer = MoELayer(
            M,
            I,
            E,
            top_k=min(top_k, E),
            gate=None,
            activation=activation,
            bias=bool(getattr(experts, "has_bias", False)),
            group=ep_mesh.get_group(),
            dtype=down.dtype,
            device=torch.device(ep_mesh.device_type),
            build_experts=lambda layout: HostExperts(experts, layout),  # the module's own parameters
            **options,
        )
        self.host = experts
        experts._flexmoe_ep = self  # a plain attribute (not a submodule): ep_layers(model) finds it

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        self.layer.train(self.host.training)  # not a submodule of the model: follow its mode
        y_TM = self.layer(hidden_states, top_k_index=top_k_index, top_k_weights=top_k_weights)
        # FSDP2 hooks the module's output for its backward all-gather; an in-place op on a view would
        # drop that hook, so a view (the layer returns one) is copied ([T, M], small beside the experts)
        return y_TM if y_TM._base is None else y_TM.clone()


def load_expert_parallel(path, *, ep_implementation: str = EP_NAME, **kwargs) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained(path, **kwargs) under DistributedConfig(ep_size=W, fsdp_size=W,
    ep_implementation): transformers shards the experts over every rank (whole experts per rank),
    applies FSDP2 to the rest and places the model on this rank's device.

    `path` is a local directory with a safetensors checkpoint; changes to the model's config go in
    `config=` (AutoConfig.from_pretrained(path, ...)), not as keyword arguments. Each rank reads only
    what it keeps (its experts, its FSDP2 rows of the rest) into the tensors the model keeps: its
    host memory peaks at about 1/W of the expert bytes plus its share of the rest (see
    rank_state_dict).
    Raises ValueError for a checkpoint that does not fill the model (missing or mis-shaped tensors,
    experts that do not stack) and, from transformers, for E % W != 0."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.distributed import DistributedConfig

    from flexmoe.integrations.transformers.rank_state_dict import rank_state_dict
    from flexmoe.integrations.transformers.safetensors_files import checkpoint_dir

    for key in ("state_dict", "distributed_config"):
        if key in kwargs:
            raise ValueError(f"load_expert_parallel sets {key} itself; do not pass it")
    path = checkpoint_dir(path)
    want_info = kwargs.pop("output_loading_info", False)
    remote = kwargs.get("trust_remote_code", False)
    # transformers takes a state dict only without a path, so what it reads beside the weights comes here
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, trust_remote_code=remote)
    if "generation_config" not in kwargs and (path / "generation_config.json").exists():
        kwargs["generation_config"] = GenerationConfig.from_pretrained(path)
    with torch.device("meta"):  # the layout only: parameter names and shapes, nothing allocated
        layout = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    state_dict = rank_state_dict(path, layout, key_mapping=kwargs.get("key_mapping"))
    model_class = type(layout)  # the Auto class wants a path; the model's own class loads from a state dict
    del layout
    W = dist.get_world_size()
    distributed = DistributedConfig(ep_size=W, fsdp_size=W, ep_implementation=ep_implementation)
    model, info = model_class.from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        distributed_config=distributed,
        output_loading_info=True,
        **kwargs,
    )
    model.config.name_or_path = str(path)
    # transformers would warn and draw a random init; a checkpoint that does not fill the model is an error
    unfilled = sorted(info["missing_keys"]) + [str(m) for m in sorted(info["mismatched_keys"])]
    if unfilled:
        raise ValueError(f"checkpoint at {str(path)!r} does not fill the model: {unfilled[:8]}")
    return (model, info) if want_info else model


def ep_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The flexmoe MoELayer of every experts module that runs under ep_implementation "flexmoe"
    (for their plans, tuner tables and last_plan)."""
    return {
        name: module._flexmoe_ep.layer
        for name, module in model.named_modules()
        if isinstance(getattr(module, "_flexmoe_ep", None), FlexMoEEP)
    }


def ep_implementation_class(**layer_options) -> type[FlexMoEEP]:
    """FlexMoEEP with fixed MoELayer settings (e.g. parallelism=1, pipeline_degree=2, tuner=False,
    all_to_all="flat"); register it under a name of your own with register_ep_implementation."""
    for key in layer_options:
        if key in _FROM_THE_MODEL:
            raise ValueError(f"the flexmoe EP implementation sets {key!r} from the model; do not pass it")
    return type("FlexMoEEP", (FlexMoEEP,), {"layer_options": MappingProxyType(dict(layer_options))})


def register_ep_implementation(name: str = EP_NAME, **layer_options) -> None:
    """Register FlexMoEEP (with `layer_options`) in transformers' EPImplementationInterface as `name`;
    importing flexmoe.integrations.transformers registers "flexmoe" with the defaults."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    cls = ep_implementation_class(**layer_options) if layer_options else FlexMoEEP
    EPImplementationInterface.register(name, cls)


__all__ = [
    "EP_NAME",
    "FlexMoEEP",
    "ep_implementation_class",
    "ep_layers",
    "load_expert_parallel",
    "register_ep_implementation",
]
