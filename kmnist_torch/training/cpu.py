"""CPU fast paths, decided in one place for training, evaluation and prediction.

- **bf16**: autocast to bfloat16 on a CPU only where it has bf16 units (``amx_bf16`` or
  ``avx512_bf16`` in ``/proc/cpuinfo``); elsewhere a bf16 matrix product is emulated and slower
  than float32 (on the 2-core AMD EPYC development machine, AVX2 only: 14-17 against 82-115
  GFLOP/s across the runs of benchmarks/cpu_speed.py; its latest is on docs/benchmarks.md).
  ``--bf16 on|off`` forces either way; on CUDA the recipe's ``amp`` decides, as before.
- **channels_last**: on CUDA as the recipe says; on a CPU always where torch has oneDNN, the
  model (:func:`prepare_model`) and its batches (:func:`prepare_batch`) alike
  (``POLICY.channels_last = "on"|"off"``, or ``configure(..., channels_last=...)``, forces
  either way on a CPU: benchmarks/train_throughput.py keeps the reference loop in torch's
  default). oneDNN's convolutions run faster on it in float32 too, once both the weights and
  the images have it. On the 2-core AMD EPYC development machine, timing 40 steps (best of
  3), the simple CNN's training steps at batch 128 went from 603 to 732 img/s (663 img/s with
  only the images converted), and its eager inference in batches of 64 from 2,095 to 3,930
  img/s; PreActResNet-18's steps at batch 32 gained nothing measurable from the layout alone
  (27.0-31.0 against 27.7-28.9 img/s in three alternating pairs). The benchmark page
  (docs/benchmarks.md) has the whole-run figures.
- **threads**: intra-op threads for the CPUs no other process is using now: the CPUs this
  process may run on (its affinity mask), less the CPU time other processes took on them over
  a 0.25 s sample of ``/proc/stat`` (this process's own time, from ``/proc/self/stat``, is not
  counted), rounded, at least 1 and at most what a cgroup ``cpu.max`` quota grants. The
  1-minute load average, used before, counts this process's own recent work and tasks waiting
  on disk: on the idle 2-core machine, right after a benchmark step, it read 1.3 and gave 1
  thread, and the simple CNN's steps ran at 374 img/s against 619 img/s on 2 (the
  training-steps row of benchmarks/cpu_speed.py, two runs). On a machine busy elsewhere fewer
  threads are right: a run of that benchmark under a load of 7.6-8.0 measured the CNN's steps
  on 1 thread at 1.94x a plain loop's on 2. The load average remains the fallback where
  ``/proc`` cannot be read. ``--threads N`` sets it.
- **freed memory kept** (:func:`keep_freed_memory`, by :func:`configure` for a CPU run):
  glibc's malloc serves large requests with fresh ``mmap`` pages and hands memory freed at the
  top of its heap back to the kernel beyond a trim threshold (twice the largest block freed,
  at most 64 MiB), so each training step page-faulted its activations in again: 6,900 minor
  faults per simple-CNN step at batch 128 (29 ms of system time) and 19,900 per
  PreActResNet-18 step at batch 32. With blocks up to 32 MiB from the heap and 256 MiB kept,
  301 and 627, and the simple CNN's steps ran at 858-1,009 img/s against 653-743 img/s in
  three alternating pairs of runs. Elsewhere (musl, macOS, Windows: no ``mallopt``), with
  an allocator preloaded or malloc's own settings in the environment, or with
  ``KMNIST_TORCH_TUNE_MALLOC=0``, nothing changes.
- **weight gradients as matrix products** (:mod:`kmnist_torch.training.cpu_conv`): where the
  CPU has AVX2 but not AVX-512 (oneDNN's convolutions then run its AVX2 kernels), the
  convolutions of a model :func:`prepare_model` prepares for training compute their weight
  gradients as chunked BLAS products, 1.2-2.6x faster than oneDNN's per layer on the
  development machine and 3-10% on a whole simple-CNN step (that module's docstring has the
  figures). Elsewhere (AVX-512, ARM: not measured) oneDNN keeps them. ``configure(...,
  gemm_wgrad="on"|"off")`` (or ``POLICY.gemm_wgrad`` after it) forces either way; the trainer
  calls ``configure`` itself, so there ``$KMNIST_TORCH_GEMM_WGRAD=1|0`` does.
- **evaluation batches**: on a CPU the model sees at most ``CPU_EVAL_BATCH`` test images at a
  time (:func:`eval_batch`), whatever the recipe's ``eval_batch_size`` (sized for a GPU): the
  activations of a smaller batch stay in the cache. ``benchmarks/cpu_speed.py --quick``
  printed the simple CNN's eager inference at 1,045 img/s in batches of 1,000 and 2,321 img/s
  in batches of 64 on the 2-core AMD EPYC (full runs: 2,140-2,450 img/s; the latest is on
  docs/benchmarks.md).
- **torch.compile** on a CPU needs a C++ compiler for the generated kernels:
  :func:`compile_available` says whether there is one.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..settings import env_flag
from . import cpu_conv

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MODES = ("auto", "on", "off")
CPUINFO = Path("/proc/cpuinfo")
PROC_STAT = Path("/proc/stat")
PROC_SELF_STAT = Path("/proc/self/stat")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Seconds between the two readings of /proc/stat that tell how busy the other processes are
# (at 100 ticks a second, 25 ticks per CPU: a neighbour busy for most of it is seen).
SAMPLE_SECONDS = 0.25


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets: blocks up to
# 32 MiB (glibc's largest mmap threshold on 64-bit) from the heap, and up to 256 MiB of freed
# heap kept for the next step instead of returned to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


@dataclass
class CpuPolicy:
    """The process's choices: ``bf16``, ``channels_last`` and ``gemm_wgrad`` (auto, on, off)
    and ``threads`` (None: chosen)."""

    bf16: str = "auto"
    threads: int | None = None
    channels_last: str = "auto"
    gemm_wgrad: str = "auto"
    # Whether keep_freed_memory has tuned the C library's malloc (None: not tried yet).
    malloc_tuned: bool | None = None


POLICY = CpuPolicy()
# Test images per forward pass on a CPU (see eval_batch).
CPU_EVAL_BATCH = 64
# torch's intra-op threads when this module was imported: a different number later means the
# process was told how many to use (the reproduction harness's workers, a test's one core).
START_THREADS = torch.get_num_threads()


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The feature flags the (first) CPU reports; empty where there is no cpuinfo."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def bf16_units(flags: frozenset[str] | None = None) -> list[str]:
    """Which of the CPU's bf16 units it reports (``amx_bf16``, ``avx512_bf16``)."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in flags]


def choose_threads(
    requested: int | None = None, cpus: int | None = None, load: float | None = None
) -> int:
    """Intra-op threads: ``requested``, else the CPUs other processes leave free (>= 1):
    ``cpus`` (default: those this process may run on) less ``load``, the CPUs busy elsewhere
    (default: :func:`busy_elsewhere` on those CPUs, or the 1-minute load average where it
    cannot tell), at most the CPUs' worth of time a cgroup quota grants (:func:`quota_cpus`)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1, got {requested}")
        return requested
    allowed = allowed_cpus()
    cpus = cpus or (len(allowed) if allowed else os.cpu_count() or 1)
    if load is None:
        load = busy_elsewhere(cpus=allowed)
    if load is None:
        load = os.getloadavg()[0]
    return max(1, min(cpus, quota_cpus() or cpus, int(cpus - load + 0.5)))


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on (its affinity mask); None where that is unknown."""
    try:
        return frozenset(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return None


def quota_cpus(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs' worth of time a cgroup v2 quota grants (``cpu.max``: quota and period, rounded
    up); None without a quota or where it cannot be read."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, UnicodeDecodeError, ValueError, ZeroDivisionError):
        return None  # "max": no quota


def busy_elsewhere(
    interval: float = SAMPLE_SECONDS,
    stat: Path = PROC_STAT,
    own: Path = PROC_SELF_STAT,
    cpus: frozenset[int] | None = None,
) -> float | None:
    """CPUs' worth of time other processes used over ``interval`` seconds on ``cpus`` (default:
    all), from two readings of ``/proc/stat``'s per-CPU lines (user, nice, system, irq,
    softirq, steal; not idle or I/O wait) less this process's own user and system time
    (``/proc/self/stat``). None where either is unreadable or malformed, or no time passed."""
    first = _busy_ticks(stat, own, cpus)
    if first is None:
        return None
    time.sleep(interval)
    second = _busy_ticks(stat, own, cpus)
    if second is None:
        return None
    busy, total, mine = (b - a for a, b in zip(first[:3], second[:3]))
    if total <= 0:
        return None
    return max(0.0, (busy - mine) / total * second[3])


def _busy_ticks(
    stat: Path, own: Path, cpus: frozenset[int] | None
) -> tuple[int, int, int, int] | None:
    """(busy ticks of the CPUs, all their ticks, this process's ticks, how many CPUs)."""
    try:
        lines = stat.read_text(encoding="ascii").splitlines()
        # After the command name (which may hold spaces and parentheses): state is field 3,
        # utime and stime are fields 14 and 15.
        fields = own.read_text(encoding="ascii").rpartition(")")[2].split()
        mine = int(fields[11]) + int(fields[12])
        busy = total = count = 0
        for line in lines:
            name, *values = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
            cpu_busy = user + nice + system + irq + softirq + steal
            busy, total, count = busy + cpu_busy, total + cpu_busy + idle + iowait, count + 1
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return None
    return (busy, total, mine, count) if count else None


def configure(
    bf16: str = "auto",
    threads: int | None = None,
    device: str | torch.device = "cpu",
    keep_threads: bool = False,
    channels_last: str = "auto",
    gemm_wgrad: str = "auto",
) -> CpuPolicy:
    """Set the process's policy; on a CPU device also torch's intra-op threads: ``threads``,
    else chosen by :func:`choose_threads` unless ``keep_threads`` (a deterministic run, whose
    numbers must not depend on the load), ``$OMP_NUM_THREADS`` (torchrun's ranks) or an
    earlier ``torch.set_num_threads`` (the reproduction harness's workers) already decided."""
    modes = {"bf16": bf16, "channels_last": channels_last, "gemm_wgrad": gemm_wgrad}
    for name, mode in modes.items():
        if mode not in BF16_MODES:
            raise ValueError(f"{name} must be one of {BF16_MODES}, got {mode!r}")
    POLICY.bf16, POLICY.threads, POLICY.channels_last = bf16, threads, channels_last
    POLICY.gemm_wgrad = gemm_wgrad
    try:
        on_cpu = torch.device(device).type == "cpu"
    except (RuntimeError, ValueError):  # not a device: the caller's own checks say so
        return POLICY
    told = torch.get_num_threads() != START_THREADS
    decided = keep_threads or told or "OMP_NUM_THREADS" in os.environ
    if on_cpu and (threads is not None or not decided):
        torch.set_num_threads(choose_threads(threads))
    if on_cpu:
        keep_freed_memory()
    return POLICY


def _malloc_chosen_elsewhere(environ: dict[str, str] | None = None) -> bool:
    """Whether the user already chose the allocator or its settings: ``MALLOC_*_`` variables,
    glibc malloc tunables, or an allocator preloaded (jemalloc, tcmalloc, mimalloc), which
    ``mallopt`` would not reach."""
    env = os.environ if environ is None else environ
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in env):
        return True
    preload = env.get("LD_PRELOAD", "")
    return "glibc.malloc" in env.get("GLIBC_TUNABLES", "") or any(
        name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")
    )


def keep_freed_memory() -> bool:
    """Tell the C library's malloc to serve blocks up to :data:`MMAP_THRESHOLD` from its heap
    and keep up to :data:`TRIM_THRESHOLD` of freed heap in each malloc arena (module
    docstring: the page faults this saves). Once per process (the setting is the process's);
    True where it took (glibc), False where the C library has no ``mallopt`` or refused,
    where the user chose the allocator or its settings (:func:`_malloc_chosen_elsewhere`),
    or where ``$KMNIST_TORCH_TUNE_MALLOC`` is 0."""
    if POLICY.malloc_tuned is None and (
        _malloc_chosen_elsewhere() or not env_flag("KMNIST_TORCH_TUNE_MALLOC", True)
    ):
        POLICY.malloc_tuned = False
    if POLICY.malloc_tuned is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError, TypeError):  # no such C library or function
            POLICY.malloc_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            POLICY.malloc_tuned = mmap and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return POLICY.malloc_tuned


def bf16_enabled(device: torch.device, recipe_amp: bool) -> bool:
    """Whether the forward pass runs under bf16 autocast on ``device``."""
    if device.type == "cuda":
        return recipe_amp if POLICY.bf16 == "auto" else POLICY.bf16 == "on"
    if device.type != "cpu":
        return False
    return POLICY.bf16 == "on" or (POLICY.bf16 == "auto" and bool(bf16_units()))


def channels_last_enabled(device: torch.device, recipe_flag: bool = False) -> bool:
    """Whether batches (and the model) use the channels_last memory format: the recipe's
    ``channels_last`` (``recipe_flag``) on CUDA; on a CPU always where torch has oneDNN,
    unless the policy's ``channels_last`` (:func:`configure`) forces either way."""
    if device.type == "cuda":
        return recipe_flag
    if device.type != "cpu":
        return False
    if POLICY.channels_last != "auto":
        return POLICY.channels_last == "on"
    return torch.backends.mkldnn.is_available()


def gemm_wgrad_enabled(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether :func:`prepare_model` gives ``device``'s convolutions matrix-product weight
    gradients (:mod:`~kmnist_torch.training.cpu_conv`): on a CPU, as ``POLICY.gemm_wgrad`` or
    ``$KMNIST_TORCH_GEMM_WGRAD`` forces, else where ``flags`` (default: the CPU's) have
    ``avx2`` but not ``avx512f``."""
    if device.type != "cpu":
        return False
    if POLICY.gemm_wgrad != "auto":
        return POLICY.gemm_wgrad == "on"
    flags = cpu_flags() if flags is None else flags
    return env_flag("KMNIST_TORCH_GEMM_WGRAD", "avx2" in flags and "avx512f" not in flags)


def prepare_model(
    model: nn.Module, device: torch.device, recipe_flag: bool = False, training: bool = False
) -> nn.Module:
    """``model`` (converted in place, and returned) in the memory format its batches will
    have: channels_last where :func:`channels_last_enabled`; for ``training`` (the trainer's
    own models, never one a user hands to ``predict`` or ``evaluate``) also with
    matrix-product weight gradients where :func:`gemm_wgrad_enabled`. Values are unchanged.
    The new parameters are ordinary tensors even when called under ``torch.inference_mode``
    (they can still be trained), and a model already in channels_last is left as it is."""
    if training and gemm_wgrad_enabled(device):
        cpu_conv.install(model)
    if not channels_last_enabled(device, recipe_flag):
        return model
    weights = [p for p in model.parameters() if p.dim() == 4]
    if all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
        return model
    with torch.inference_mode(False), torch.no_grad():
        return model.to(memory_format=torch.channels_last)


def prepare_batch(x: torch.Tensor, device: torch.device, recipe_flag: bool = False) -> torch.Tensor:
    """Images ``x`` (B x C x H x W) in the memory format of :func:`prepare_model`'s model."""
    if x.dim() == 4 and channels_last_enabled(device, recipe_flag):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: torch.device, recipe_amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when :func:`bf16_enabled`, else nothing."""
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16_enabled(device, recipe_amp))


def eval_batch(device: torch.device, batch: int) -> int:
    """Images per evaluation forward pass on ``device``: ``batch`` (the recipe's), at most
    ``CPU_EVAL_BATCH`` on a CPU."""
    return min(batch, CPU_EVAL_BATCH) if device.type == "cpu" else batch


def compile_available() -> bool:
    """Whether torch.compile can build CPU kernels here (a C++ compiler on the PATH)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


@contextlib.contextmanager
def inference(device: torch.device, recipe_amp: bool = False) -> Iterator[None]:
    """The evaluation and prediction path: no autograd, and bf16 autocast as in training."""
    with torch.inference_mode(), autocast(device, recipe_amp):
        yield
