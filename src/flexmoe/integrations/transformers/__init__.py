"""flexmoe inside Hugging Face transformers (optional extra: `pip install flexmoe[transformers]`).

Importing this package registers
- the experts backend "flexmoe" in transformers' `ExpertsInterface`:

      model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="flexmoe")

  runs every MoE block's experts through flexmoe's grouped FFN (hand-written backward, kept rows
  only) on the model's own weights (views, no copies); custom gates (GPT-OSS) through grouped GEMMs
  around the module's own element-wise code;
- the EP implementation "flexmoe" in transformers' `EPImplementationInterface`:

      DistributedConfig(ep_size=W, fsdp_size=F, ep_implementation="flexmoe")

  runs the token exchange of transformers' own expert parallelism (beside its FSDP2) with
  flexmoe's plans and run-time tuner, on transformers' expert layout.

The alternative under torch.distributed: `shard_experts(model)` moves the experts into flexmoe's
sharded layout (hidden slices too, when E < W) and runs them with flexmoe's adaptive plans;
`unshard_experts(model)` gives the full Hugging Face parameters back.
"""

from flexmoe.integrations.transformers.backend import (
    BACKEND_NAME,
    expert_weights,
    flexmoe_experts_forward,
    register,
)
from flexmoe.integrations.transformers.ep_implementation import (
    EP_NAME,
    FlexMoEEP,
    ep_implementation_class,
    ep_layers,
    load_expert_parallel,
    register_ep_implementation,
)
from flexmoe.integrations.transformers.sharding import moe_experts_modules, shard_experts, unshard_experts

# the documented exception to "no import-time side effects": registering is the point
register()
register_ep_implementation()

__all__ = [
    "BACKEND_NAME",
    "EP_NAME",
    "FlexMoEEP",
    "ep_implementation_class",
    "ep_layers",
    "expert_weights",
    "flexmoe_experts_forward",
    "load_expert_parallel",
    "moe_experts_modules",
    "register",
    "register_ep_implementation",
    "shard_experts",
    "unshard_experts",
]
