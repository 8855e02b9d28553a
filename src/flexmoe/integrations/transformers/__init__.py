"""flexmoe inside Hugging Face transformers (optional extra: `pip install flexmoe[transformers]`).

Importing this package registers the experts backend "flexmoe" in transformers'
`ExpertsInterface`, so

    import flexmoe.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="flexmoe")

runs every MoE block's experts through flexmoe's grouped FFN (hand-written backward, kept rows
only), on the model's own weights (views, no copies). Under torch.distributed,
`shard_experts(model)` moves the experts into flexmoe's sharded layout and runs them with flexmoe's
adaptive plans; `unshard_experts(model)` gives the full Hugging Face parameters back.
"""

from flexmoe.integrations.transformers.backend import (
    BACKEND_NAME,
    expert_weights,
    flexmoe_experts_forward,
    register,
)
from flexmoe.integrations.transformers.sharding import moe_experts_modules, shard_experts, unshard_experts

register()  # the documented exception to "no import-time side effects": registering is the point

__all__ = [
    "BACKEND_NAME",
    "expert_weights",
    "flexmoe_experts_forward",
    "moe_experts_modules",
    "register",
    "shard_experts",
    "unshard_experts",
]
