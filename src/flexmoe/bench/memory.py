"""Working memory of one step: the peak of the bytes it allocates above what was live before it.

"Working memory" of a layer's forward + backward is the peak of allocated tensor memory during the
step minus what was allocated when it started (parameters, input, anything else already alive), so
activations, saved tensors, temporaries, the output and the parameter gradients count.

- CUDA: torch.cuda's own counters (max_memory_allocated after reset_peak_memory_stats).
- CPU: torch has no peak counter for host memory, but its CPU allocator reports every allocation and
  free (with the size) to the profiler when `profile_memory=True`. We replay those events in time
  order and take the peak of the running sum. Blocks allocated before the step and freed during it
  are not credited (the allocator reports no size for them), so the figure can only err high.
  Memory that libraries take outside torch's allocator (e.g. oneDNN scratch pads) is not counted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from flexmoe.bench.common import synchronize


def _cpu_peak(step: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def working_memory(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes `step()` allocates above what was allocated when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda' for working_memory, got {device.type!r}")
    return _cpu_peak(step)
