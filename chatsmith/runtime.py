"""Where the code runs: device and dtype resolution, threads, the torchrun process group.

Everything that reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) reads it here,
so the trainer, the stages and the serving verbs agree on who they are. A plain `python` run is
rank 0 of a world of 1 and joins no process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch
import torch.distributed as dist

from chatsmith.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda|mps -> a torch.device (under torchrun, cuda is this process's GPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if name == "mps" and not _mps_available():
        raise UserError("--device mps was asked for, but this PyTorch has no MPS backend")
    if name == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX). Without it PyTorch
    emulates bf16 matmuls, which measured ~1 GFLOP/s on a Zen 3 core against ~100 for fp32."""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:  # not Linux: say no, so bf16 on a CPU is never a silent default
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def autocast_dtype(dtype: str, device: torch.device):
    """--dtype -> the dtype autocast runs matmuls in (weights stay fp32), or None for plain fp32.
    auto: bf16 on a CUDA GPU that supports it, fp32 elsewhere (bf16 is never chosen for a CPU)."""
    if dtype == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            print("warning: --dtype bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag): "
                  "PyTorch emulates it, often 10-100x slower than fp32; --dtype fp32 (or auto) avoids that",
                  file=sys.stderr, flush=True)
        return torch.bfloat16
    if dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def set_threads(n: int | None):
    """Intra-op threads for this process (None or 0: PyTorch's default, one per core)."""
    if n:
        torch.set_num_threads(n)


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world size) under torchrun (which sets RANK/WORLD_SIZE/MASTER_ADDR...), after joining
    the process group once: NCCL between GPUs, gloo on CPU. A plain `python` run is (0, 1)."""
    world, r = world_size(), rank()
    if world > 1 and not dist.is_initialized():
        dev = resolve_device(device)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return r, world


@contextlib.contextmanager
def rank0_first(device: str = "auto"):
    """Rank 0 runs the block first (building shared files: tokenizer, token shards), the other ranks
    wait at a barrier and then run it and find the files made; without torchrun it just runs."""
    r, world = init_distributed(device)
    if world > 1 and r != 0:
        dist.barrier()
    yield
    if world > 1 and r == 0:
        dist.barrier()


def micro_batch_index(step: int, micro: int, rank: int, grad_accum: int, world: int) -> int:
    """The global index of one process's micro-batch: every (step, micro, rank) gets its own, in the
    order a single process with world * grad_accum micro-batches per step would see them. Batches
    drawn from this index are a pure function of it, which is what makes resume exact."""
    return (step * grad_accum + micro) * world + rank


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning big blocks to the OS. By default every
    activation tensor above the mmap threshold is mapped and unmapped each step, and its pages fault
    in again on the next; keeping them measured +14% tokens/s for both chatsmith and transformers
    on the 2-core reference machine (bench/train_throughput.py --malloc-keep sets the same through
    MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_). The cost: the process keeps its peak memory."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def return_freed_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). glibc raises its mmap threshold
    after big blocks are freed, so a server's KV cache and activations, once freed, would stay in
    the process's RSS at their peak; the server calls this when it goes idle."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


__all__ = ["DEVICES", "DTYPES", "world_size", "rank", "local_rank", "resolve_device", "autocast_dtype",
           "cpu_has_native_bf16", "set_threads", "init_distributed", "rank0_first", "micro_batch_index", "keep_freed_memory",
           "return_freed_memory"]
