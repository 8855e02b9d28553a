"""Public path of plan files; they live in `flexmoe.tuning.plan_table`."""

from flexmoe.tuning.plan_table import *  # noqa: F403
from flexmoe.tuning.plan_table import __all__  # noqa: F401
