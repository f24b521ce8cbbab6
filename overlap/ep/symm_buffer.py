"""Symmetric buffers: one allocation per rank that every rank of a process group can write.

Built on ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous``). Kernels get the
peers' addresses as an int64 device array, ``peer_bases[r]`` being rank r's buffer as mapped in
this process. The mapping is checked once at construction: each rank writes a canary into its
own buffer, then reads every peer's through ``peer_bases``; a mismatch raises at once instead of
corrupting memory later.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

_CANARY_MAGIC = 0x4F564C50 << 24  # "OVLP", leaves 24 bits for the rank and the allocation number


def _symm_mem():
    import torch.distributed._symmetric_memory as symm_mem  # imported late: absent on some builds

    return symm_mem


def _enable_group(symm_mem, group_name: str) -> None:
    # Older torch needs this before rendezvous; newer torch deprecates it (and does not need it).
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    is_enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", None)
    if enable is None or (is_enabled is not None and is_enabled(group_name)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable(group_name)


def _sync_group(group, device: torch.device) -> None:
    """Return once every rank's work queued so far on its current stream has finished."""
    token = torch.ones(1, device=device)
    dist.all_reduce(token, group=group)
    torch.cuda.synchronize(device)


class SymmetricBuffer:
    """``nbytes`` bytes of device memory on every rank of ``group``, writable by all of them.

    Args:
        group: the process group (NCCL, one GPU per rank, all on one NVLink host).
        nbytes: size of each rank's buffer.
        device: this rank's CUDA device.
        zero_bytes: the first ``zero_bytes`` are zeroed on every rank before any rank returns
            (signal words must start at zero).
        canary_offset: 8-byte slot inside the zeroed prefix used for the mapping check.
        generation: a number all ranks agree on, mixed into the canary so a stale mapping of an
            earlier buffer cannot pass the check.
    """

    def __init__(self, group, nbytes: int, device: torch.device, *, zero_bytes: int, canary_offset: int,
                 generation: int = 0):
        if canary_offset % 8 or canary_offset + 8 > zero_bytes or zero_bytes > nbytes:
            raise ValueError(f"bad layout: canary_offset={canary_offset}, zero_bytes={zero_bytes}, nbytes={nbytes}")
        symm_mem = _symm_mem()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.nbytes = nbytes
        group_name = group.group_name
        _enable_group(symm_mem, group_name)
        self.tensor = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        try:
            self.handle = symm_mem.rendezvous(self.tensor, group_name)
        except Exception as exc:
            raise RuntimeError(f"symmetric-memory rendezvous of {nbytes} bytes failed on rank {self.rank} "
                               f"(the cuda EP backend needs all ranks on one host with peer access, e.g. NVLink): "
                               f"{exc}") from exc
        ptrs = [int(p) for p in self.handle.buffer_ptrs]
        # torch versions differ on whether buffer_ptrs are allocation bases or tensor addresses;
        # exchange each rank's own offset from its entry so both conventions give the tensor.
        own_offset = torch.tensor([self.tensor.data_ptr() - ptrs[self.rank]], dtype=torch.int64, device=device)
        offsets = torch.empty(self.world_size, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(offsets, own_offset, group=group)
        bases = [p + o for p, o in zip(ptrs, offsets.tolist())]
        if any(b % 16 for b in bases):
            raise RuntimeError(f"symmetric buffer addresses are not 16-byte aligned: {bases}")
        self.peer_bases = torch.tensor(bases, dtype=torch.int64, device=device)

        self.tensor[:zero_bytes].zero_()
        self._canary_offset = canary_offset
        self._canary_base = _CANARY_MAGIC | ((generation & 0xFFFF) << 8)
        self.tensor[canary_offset:canary_offset + 8].view(torch.int64).fill_(self._canary_base | self.rank)
        _sync_group(group, device)  # every rank's zeroing and canary are in place
        self._check_mapping()
        _sync_group(group, device)  # nobody signals into a buffer before its owner checked

    def _check_mapping(self) -> None:
        seen = torch.ops.overlap.intranode_read_peer_u64(self.peer_bases, self._canary_offset).tolist()
        expected = [self._canary_base | r for r in range(self.world_size)]
        if seen != expected:
            bad = [r for r in range(self.world_size) if seen[r] != expected[r]]
            raise RuntimeError(f"symmetric memory mapping check failed on rank {self.rank}: peer buffers of ranks "
                               f"{bad} do not hold their canary (read {[hex(seen[r]) for r in bad]}); "
                               "torch's symmetric-memory peer pointers are not what this backend expects")

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Keep the memory from being reused until ``stream``'s queued work is done when it is freed."""
        self.tensor.record_stream(stream)
