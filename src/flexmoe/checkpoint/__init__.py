"""Sharded, atomic checkpoints that load at any world size (DESIGN section 8).

A checkpoint is a directory:

    <path>/meta.pt            format, version, saving world size W, step, extra, and for every Experts
                              module: its layout metadata (E, M, H, activation, W_e, s), whether it has
                              biases, the shard shapes, and which file holds each layout rank's shard;
                              every other file's size and BLAKE2b digest, and its tensors' digests
                              (written last; a load verifies each file before using it: integrity.py)
    <path>/replicated.pt      the replicated (non-expert) entries of the model's state_dict, their
                              optimizer state keyed by parameter NAME, the optimizer's param groups
                              (hyper-parameters, parameter names), the scheduler state, and the
                              run-time tuners' decided buckets by module name (agreed, so replicated)
    <path>/experts-00003.pt   what rank 3 of the checkpoint group holds: per Experts module its
                              shards (fc1_weight [E_local, M, X], ...) and their optimizer state

Every file is written with torch.save and read back with torch.load(weights_only=True). Saving goes
to a temporary directory next to the target (`.<name>.tmp`), which is renamed into place after every
rank has written its file; an older checkpoint at the target is moved aside (`.<name>.old`) for the
instant between the two renames and deleted after. Loading re-slices: for every expert a rank needs
under its own layout, the whole expert is reassembled from the saved shards that hold it (one expert
at a time, reading only the files that hold it) and sliced with the loading layout, and so is every
optimizer state tensor shaped like the shard (AdamW's exp_avg, exp_avg_sq); scalar states (step)
are copied. Both directions take their slices from ExpertLayout.shard_expert (applied to index
tensors), so the layout stays the only place that knows how an expert is cut.

Why torch.save files and not torch.distributed.checkpoint: the shards are not plain chunks of a
global tensor (swiglu's fc1 holds the gate and up slices side by side, fc2_bias is cut along M), so
DCP would need a custom planner to re-slice them, while per-rank files plus the layout's own slicing
make re-slicing explicit, testable on one process, and need nothing but torch.save/torch.load.

Modules: files.py (the directory on disk, atomic publication), collective.py (agreement across ranks),
integrity.py (checksums), model_state.py (what is taken from the model and optimizer), reslice.py,
save.py, load.py.

Legend: E experts, E_local experts per rank, M model dim, H hidden dim, X fc1 width (H, or 2H for
swiglu), W ranks of the checkpoint group, W_e ranks of a layer's layout, s = max(1, W_e / E).
"""

from flexmoe.checkpoint.files import META_FILE, REPLICATED_FILE, expert_file
from flexmoe.checkpoint.load import load_checkpoint, read_extra
from flexmoe.checkpoint.save import save_checkpoint

__all__ = ["META_FILE", "REPLICATED_FILE", "expert_file", "load_checkpoint", "read_extra", "save_checkpoint"]
