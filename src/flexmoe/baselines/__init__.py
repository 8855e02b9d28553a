"""Reference formulations flexmoe is measured against."""

from flexmoe.baselines.gshard import GShardMoELayer

__all__ = ["GShardMoELayer"]
