"""Public path of the data-parallel helpers; they live in `flexmoe.parallel.data_parallel`."""

from flexmoe.parallel.data_parallel import *  # noqa: F403
from flexmoe.parallel.data_parallel import __all__  # noqa: F401
