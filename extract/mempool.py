"""CUDA's stream-ordered memory pool, from which nvImageCodec allocates decoded images.

nvImageCodec's Python ``Decoder`` gives every decoded image a buffer of its own from
``cudaMallocAsync`` and frees it with ``cudaFreeAsync`` when the image is dropped. Both come
from the device's current memory pool, which by default returns every byte it does not
hold in use to the driver at the next stream, event or device synchronisation (release
threshold 0). The JPEG engines' decoder synchronises on an event for each small group of
images, so each batch of 512 images of 1280x720 (1.4 GB) would be mapped again image by
image. PyTorch's own ``cudaMallocAsync`` backend sets the threshold to the maximum for the
same reason; :func:`keep_pool_memory` does that for the pool the decoder uses, and
:func:`trim_pool` gives the unused memory back, and the threshold its value, when the
pipeline ends.

Through the CUDA driver API (``libcuda``, present wherever a GPU is), by ``ctypes``: torch
does not expose the pool's attributes.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_RELEASE_THRESHOLD = 4  # CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
_RESERVED_MEM_CURRENT = 5  # CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT
_KEEP_ALL = 2**64 - 1
_lib: list[ctypes.CDLL | None] = []
_lock = threading.Lock()


def _driver() -> ctypes.CDLL | None:
    if not _lib:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            if lib.cuInit(0) != 0:
                lib = None
        except OSError:
            lib = None
        _lib.append(lib)
    return _lib[0]


def _pool(device: torch.device) -> ctypes.c_void_p | None:
    """The device's current memory pool (the one ``cudaMallocAsync`` uses), or None."""
    if device.type != "cuda":
        return None
    lib = _driver()
    if lib is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    dev, pool = ctypes.c_int(), ctypes.c_void_p()
    try:
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0 or lib.cuDeviceGetMemPool(ctypes.byref(pool), dev) != 0:
            return None
    except AttributeError:  # a driver older than CUDA 11.2: no pools
        return None
    return pool


def _get(pool: ctypes.c_void_p, attribute: int) -> int | None:
    value = ctypes.c_uint64()
    if _driver().cuMemPoolGetAttribute(pool, attribute, ctypes.byref(value)) != 0:
        return None
    return value.value


def _set_threshold(pool: ctypes.c_void_p, nbytes: int) -> bool:
    value = ctypes.c_uint64(nbytes)
    return _driver().cuMemPoolSetAttribute(pool, _RELEASE_THRESHOLD, ctypes.byref(value)) == 0


def release_threshold(device: torch.device) -> int | None:
    """Bytes the pool keeps reserved across synchronisations (None: no pool, e.g. a CPU)."""
    pool = _pool(device)
    return None if pool is None else _get(pool, _RELEASE_THRESHOLD)


def reserved_bytes(device: torch.device) -> int | None:
    """Bytes of device memory the pool holds now, in use or not (None: no pool)."""
    pool = _pool(device)
    return None if pool is None else _get(pool, _RESERVED_MEM_CURRENT)


def set_release_threshold(device: torch.device, nbytes: int) -> bool:
    """Set the bytes the pool keeps reserved across synchronisations (CUDA's default: 0).
    True where it was set."""
    pool = _pool(device)
    if pool is None:
        return False
    with _lock:
        return _set_threshold(pool, nbytes)


_before: dict[int, int] = {}  # pool handle -> its threshold before keep_pool_memory


def keep_pool_memory(device: torch.device) -> bool:
    """Let the pool keep the memory freed into it (release threshold at its maximum), so
    that decoded images reuse it instead of mapping new memory, until :func:`trim_pool`.
    True where it was set."""
    pool = _pool(device)
    if pool is None:
        return False
    with _lock:
        previous = _get(pool, _RELEASE_THRESHOLD)
        if previous is None or not _set_threshold(pool, _KEEP_ALL):
            return False
        _before.setdefault(pool.value, previous)
        return True


def trim_pool(device: torch.device) -> None:
    """Give the memory the pool holds but does not use back to the driver, and the pool
    its release threshold from before :func:`keep_pool_memory`."""
    pool = _pool(device)
    if pool is None:
        return
    torch.cuda.synchronize(device)  # frees queued on streams reach the pool first
    with _lock:
        previous = _before.pop(pool.value, None)
        if previous is not None:
            _set_threshold(pool, previous)
        _driver().cuMemPoolTrimTo(pool, ctypes.c_size_t(0))
