"""Compute kernels (torch ops with hand-written backward), below the layer."""
