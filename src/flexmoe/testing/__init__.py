"""Helpers for testing code built on flexmoe, e.g. a pool of gloo ranks for multi-process tests."""

from flexmoe.testing.distributed import DistributedPool, DistributedPoolError, free_port

__all__ = ["DistributedPool", "DistributedPoolError", "free_port"]
