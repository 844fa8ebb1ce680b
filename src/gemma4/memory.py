"""Handing freed memory back to the OS (glibc), and keeping the weights in huge pages where Linux offers them."""
from __future__ import annotations

import ctypes
import mmap
import functools
import os


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS. glibc keeps freed memory for reuse, so a prefill's
    activations stayed resident while the KV-shared layers' weights were paged in after them (the peak RSS
    of an int4 E2B prefill is the activations plus every weight). Costs about a millisecond."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def return_prompt_buffers() -> None:
    """After a prefill's prompt-sized work: `return_freed_heap` where the heap is unpooled (`configure_heap`);
    where it is pooled the freed buffers stay for the next prefill, whose page faults would cost more."""
    if not _POOLED:
        return_freed_heap()


def _native_bf16() -> bool:
    from . import hardware

    try:
        return hardware.native_bf16()
    except ValueError:  # a bad GEMMA4_BF16_GEMM: said clearly where it is used, not at import
        return False


_POOLED = False  # set by configure_heap


def heap_pooled() -> bool:
    """Whether configure_heap pooled the C heap (bf16 native), for `gemma4 info --hardware`."""
    return _POOLED


def configure_heap(unpooled_threshold: int = 1 << 20) -> None:
    """How glibc serves prompt-sized buffers, chosen by whether bf16 is native (a user's MALLOC_MMAP_THRESHOLD_
    wins; not glibc: nothing to do). By default glibc raises its mmap threshold to the largest block freed so
    far and its trim threshold to twice that, so a prefill's buffers alternate between fresh mappings and a
    heap it trims: a 512-token bf16 E2B prefill took 65-98k page faults (a 4 kB page each), ~15% of its time.
    - bf16 emulated (fp32 activations, slow GEMMs): every buffer of `unpooled_threshold` bytes or more gets
      its own mapping, unmapped when freed, and each prefill trims the heap: the peak RSS of a 512-token E2B
      prefill was 11 MB lower in bf16 and ~35 MB in int4, for ~2% of its time.
    - bf16 native (prefill several times faster): pooled. Buffers up to 32 MB (glibc's largest threshold) come
      from a heap that is never trimmed, so the next prefill reuses them: 2.3k page faults a prefill, 1.15-1.2x
      its speed, for 10-14 MB of peak RSS (README "CPU paths")."""
    global _POOLED
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    _POOLED = _native_bf16()
    if _POOLED:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    else:
        mallopt(-3, unpooled_threshold)


# ---------------------------------------------------------------------------------------------
# Weights in huge pages. A decode step streams every weight once; from 4 kB pages that is a TLB miss per
# page, and under virtualization each miss walks two page tables: one thread's int4 product read a memory-
# mapped weight at 7.9 GB/s, the same bytes in 2 MB pages at 12.6 GB/s (two threads: 17.7 -> 25.8 GB/s;
# bf16: 21 -> 27 GB/s). So on a CPU the loaded weights are copied into one anonymous mapping the kernel
# backs with transparent huge pages (madvise), where Linux offers them.

_HUGE_PAGE = 2 << 20


def hugepages() -> bool:
    """Whether loaded CPU weights go to huge pages: Linux transparent huge pages set to "always" or
    "madvise", unless GEMMA4_HUGEPAGES=0 (keep them memory-mapped from the checkpoint file)."""
    setting = os.environ.get("GEMMA4_HUGEPAGES", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"GEMMA4_HUGEPAGES must be 0 or 1, got {setting!r}")
    if setting == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_tensor(nbytes: int):
    """A uint8 tensor of nbytes, zeroed, in an anonymous mapping advised for huge pages, from a 2 MB boundary.
    Pages become resident as they are written."""
    import torch

    pages = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shmem
    pages.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(pages, dtype=torch.uint8)  # keeps `pages` alive
    start = -whole.data_ptr() % _HUGE_PAGE
    return whole[start:start + nbytes]


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of this process's file mappings (/proc/self/maps lines with an inode)."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, int(fields[2], 16), fields[5].rstrip("\n")))
    return found


def _read_from_file(t, dst, mappings: list[tuple[int, int, int, str]]) -> bool:
    """Fill dst with t's bytes by pread when t lies in a file mapping (a checkpoint read memory-mapped), so
    none of its pages become resident here: copied through the mapping, each weight would be held twice
    until the whole file's mapping is freed. False when t is not file-backed (or the file is gone). Assumes
    the mapping holds the file's bytes: gemma4.load never writes a tensor it mapped (checkpoint values are
    used as stored, or converted into new tensors)."""
    begin = t.data_ptr()
    for start, end, offset, path in mappings:
        if start <= begin and begin + t.nbytes <= end:
            break
    else:
        return False
    view = (ctypes.c_char * t.nbytes).from_address(dst.data_ptr())
    try:
        f = open(path, "rb", buffering=0)
    except OSError:
        return False
    with f:
        done = 0
        while done < t.nbytes:
            n = os.preadv(f.fileno(), [memoryview(view)[done:done + (8 << 20)]], offset + begin - start + done)
            if n <= 0:
                raise OSError(f"{path}: short read while moving weights to huge pages")
            done += n
    return True


def _fits(nbytes: int) -> bool:
    """Whether nbytes of resident weights leave a quarter of the memory Linux says is available (a 62 GB bf16
    31B on a 24 GB machine runs only memory-mapped, paged in and out from its file)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False
    return nbytes <= 0.75 * available


def move_to_hugepages(model, keep=()) -> int:
    """Copy every CPU parameter and persistent buffer of `model` but those in `keep` into one huge-page
    mapping, one tensor at a time: read from the file where the tensor is memory-mapped from one (its pages
    never become resident here), else copied, each source freed as it goes (the C heap trimmed every 64 MB),
    so the resident set grows by little more than one tensor. Tied tensors stay tied (one
    Parameter object). Nothing moves where the weights would take over 3/4 of the available memory. Returns
    the bytes moved."""
    import torch

    kept = {t.data_ptr() for t in keep}
    where: dict[int, list] = {}  # id(tensor) -> [(store, name)]: every place that holds it
    todo = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type != "cpu" or t.data_ptr() in kept or not t.numel() \
                        or name in getattr(module, "_non_persistent_buffers_set", ()):
                    continue
                if id(t) not in where:
                    where[id(t)] = []
                    todo.append(t)
                where[id(t)].append((store, name))
    if not todo or not _fits(sum(t.nbytes for t in todo)):
        return 0
    def padded(t):  # each tensor starts on a cache line
        return -(-t.nbytes // 64) * 64

    arena, offset = hugepage_tensor(sum(padded(t) for t in todo)), 0
    mappings, since_trim = _file_mappings(), 0
    todo.reverse()
    while todo:
        t = todo.pop()
        size = padded(t)
        slot = arena[offset:offset + size][:t.nbytes].view(t.dtype).view(t.shape)
        if not (t.is_contiguous() and _read_from_file(t, slot, mappings)):
            slot.copy_(t.detach())
        new = torch.nn.Parameter(slot, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
            else slot
        for store, name in where.pop(id(t)):
            store[name] = new
        offset, since_trim = offset + size, since_trim + size
        del t, new
        if since_trim >= 64 << 20:
            return_freed_heap()
            since_trim = 0
    return_freed_heap()
    return offset
