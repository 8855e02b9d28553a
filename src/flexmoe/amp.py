"""Public path of flexmoe's autocast helpers; they live in `flexmoe.ops.amp`."""

from flexmoe.ops.amp import *  # noqa: F403
from flexmoe.ops.amp import __all__  # noqa: F401
