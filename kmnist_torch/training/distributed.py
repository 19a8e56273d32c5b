"""Data-parallel training with PyTorch's own engine: ``torch.distributed`` and
``DistributedDataParallel``, launched by ``torchrun``.

What a process needs to know about the others lives in :class:`Dist` (rank, world size, a gloo
group for small host-side messages). One process (``torchrun`` not used) is ``Dist()``: every
helper here is then a no-op, so the engine has one code path.

Semantics (docs/distributed.md says the same for users):

- The recipe's batch size is the *global* batch; each of the N processes takes ``B / N`` rows
  of every global batch, in order (:func:`part`), from an order drawn from the shared seed.
  The global batch of step i is the single-process batch of step i.
- Random draws made per batch (mixup's lambda and layer, translations) come from generators
  seeded alike on every rank and consumed in lockstep; see
  :func:`kmnist_torch.training.mixup.draw` and
  :func:`kmnist_torch.training.augment.random_translate` (``shard=``).
- Stop requests (the SIGINT/SIGTERM that ``torchrun`` forwards) are agreed on with
  an all-reduce at every step boundary (:class:`SharedStop`), so all ranks stop after the same
  step and rank 0 writes one checkpoint.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data.loader import part
from ..errors import TrainError, UserError
from ..settings import env_number
from .runtime import StopRequest

__all__ = ["Dist", "SharedStop", "check_env", "part", "rank_seed", "setup", "teardown"]

T = TypeVar("T")


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank's own random streams (dropout), independent of every other rank's."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run: ``rank`` of ``world_size`` processes,
    ``local_rank`` on its machine, and a gloo group for host-side messages (stop flags,
    random states, the checkpoint), which never make a CUDA device wait."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cpu_group: Any = None

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints the epoch lines."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)``, as the loader, mixup and translation take it."""
        return self.rank, self.world_size

    # ------------------------------------------------------------------- collectives

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (on its device); returns it."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value`` (over the gloo group: no device waits)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """The 1-D tensors of every rank, of any lengths, concatenated in rank order."""
        if not self.active:
            return t
        size = torch.tensor([len(t)], device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

    def gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled, over the gloo group)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its :class:`TrainError`) to every
        rank: rank 0 alone reads and creates the output folder, so the ranks need not share a
        filesystem to resume, and an error on rank 0 stops every rank instead of hanging."""
        if not self.active:
            return fn()
        box: list[Any] = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except (UserError, OSError) as exc:  # any error rank 0 can meet here, not a hang
                box[1] = str(exc)
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        if box[1] is not None:
            raise TrainError(box[1])
        return box[0]

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics): each rank updated
        its own from its own rows in the last forward, and rank 0's are the ones saved."""
        if self.active:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def stop_request(self) -> SharedStop | StopRequest:
        """The stop request for this run: agreed on by every rank when there are several."""
        return SharedStop(self) if self.active else StopRequest()


class SharedStop:
    """:class:`~kmnist_torch.training.runtime.StopRequest` agreed on by every rank:
    ``requested`` is an all-reduce of each rank's own request, so every rank must read it at
    the same points (the engine reads it at step boundaries, and before and during
    evaluation). ``torchrun`` forwards the signal it gets (Ctrl-C's SIGINT, or a scheduler's
    SIGTERM) to the workers and kills them 30 s later, time enough to finish a step and write
    the checkpoint; every rank then knows the signal (SIGTERM where ranks got different ones),
    and exits with 128 + it."""

    def __init__(self, ctx: Dist) -> None:
        self.ctx = ctx
        self.local = StopRequest()

    def __enter__(self) -> SharedStop:
        self.local.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.local.__exit__(*exc)

    @property
    def signum(self) -> int | None:
        """The signal that asked this rank to stop (None: none yet)."""
        return self.local.signum

    @property
    def requested(self) -> bool:
        """True on every rank once any rank was asked to stop."""
        agreed = self.ctx.max_int(self.local.signum or 0)
        if agreed:
            self.local.ask(agreed)
        return bool(agreed)


# ------------------------------------------------------------------------- process group


def launched() -> bool:
    """Started by ``torchrun`` (or with its environment) with more than one process (a
    ``WORLD_SIZE`` that is not a whole number is :func:`check_env`'s to explain)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


RENDEZVOUS_TIMEOUT = 180.0  # seconds; torch's own default is 30 minutes


def _whole(name: str, low: int, high: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        raise TrainError(
            f"${name} is not set: launch with torchrun, or set RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT for every process"
        )
    try:
        value = int(text)
    except ValueError:
        value = None
    upper = "" if high is None else f" and below {high}"
    if value is None or value < low or (high is not None and value >= high):
        raise TrainError(f"${name}={text!r} is not allowed: use a whole number >= {low}{upper}")
    return value


def check_env() -> tuple[int, int, int, str, int]:
    """``(rank, world_size, local_rank, master_addr, master_port)`` from the environment,
    each checked before anything waits on them: set, whole numbers, ``RANK`` below
    ``WORLD_SIZE``, ``LOCAL_RANK`` below ``LOCAL_WORLD_SIZE`` (when set) and no above
    ``RANK``, a port in 1-65535. A :class:`TrainError` naming the variable otherwise."""
    world = _whole("WORLD_SIZE", 1)
    rank = _whole("RANK", 0, world)
    if os.environ.get("LOCAL_WORLD_SIZE", "").strip():
        local_world = _whole("LOCAL_WORLD_SIZE", 1, world + 1)
        local = _whole("LOCAL_RANK", 0, local_world)
    else:
        local = _whole("LOCAL_RANK", 0, world)
    if local > rank:
        raise TrainError(
            f"$LOCAL_RANK={local} is above $RANK={rank}: a process's rank on its machine "
            "cannot exceed its rank in the run"
        )
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise TrainError("$MASTER_ADDR is not set: the host of rank 0 (torchrun sets it)")
    port = _whole("MASTER_PORT", 1, 65536)
    return rank, world, local, addr, port


def rendezvous_timeout() -> float:
    """``$KMNIST_TORCH_RENDEZVOUS_TIMEOUT`` (seconds, 1 to 86400; default 180)."""
    try:
        return env_number(
            "KMNIST_TORCH_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT, ">=1", at_most=86400
        )
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def _meet(rank: int, world: int, addr: str, port: int) -> Any:
    """The store every rank meets at, once every rank has joined it: a :class:`TrainError`
    naming the missing ranks after ``$KMNIST_TORCH_RENDEZVOUS_TIMEOUT`` seconds, or a rank
    claimed twice, or two world sizes."""
    timeout = rendezvous_timeout()
    wait = datetime.timedelta(seconds=timeout)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hint = "($KMNIST_TORCH_RENDEZVOUS_TIMEOUT)"
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent,
                              timeout=wait, wait_for_workers=False, multi_tenant=True)  # fmt: skip
    except (RuntimeError, OSError) as exc:
        who = "rank 0 is not there" if rank else "the port is taken"
        raise TrainError(
            f"rank {rank} could not meet the others at MASTER_ADDR={addr} MASTER_PORT={port} "
            f"within {timeout:g} s {hint}: {who} ({str(exc).splitlines()[0][:200]})"
        ) from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"kmnist_torch/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/"
    if store.add(f"{prefix}rank{rank}", 1) > 1:
        raise TrainError(f"$RANK={rank} is claimed by two processes: give each its own rank")
    store.set(f"{prefix}world{rank}", str(world))
    keys = [f"{prefix}rank{r}" for r in range(world)]
    try:
        store.wait(keys, wait)
    except RuntimeError:
        missing = [str(r) for r, k in enumerate(keys) if not store.check([k])]
        raise TrainError(
            f"rank {rank}: rank(s) {', '.join(missing)} of WORLD_SIZE={world} did not join "
            f"within {timeout:g} s {hint}; start every rank, with the same MASTER_ADDR and "
            "MASTER_PORT"
        ) from None
    sizes = {store.get(f"{prefix}world{r}").decode() for r in range(world)}
    if sizes != {str(world)}:
        raise TrainError(f"the ranks disagree on $WORLD_SIZE ({', '.join(sorted(sizes))})")
    return dist.PrefixStore(f"{prefix}pg/", store)


def setup(device: str | None) -> tuple[Dist, torch.device | None]:
    """Join the process group ``torchrun`` describes in the environment, after checking the
    environment (:func:`check_env`) and meeting every rank within a bounded time.

    Args:
        device: the ``--device`` asked for: None or ``cuda`` (each rank on
            ``cuda:LOCAL_RANK``, NCCL) or ``cpu`` (gloo).

    Returns:
        ``(Dist, device)``; ``(Dist(), None)`` when not launched with several processes.
    """
    if not launched():
        return Dist(), None
    rank, world, local, addr, port = check_env()
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cuda", "cpu"):
        raise TrainError(
            f"--device {device}: under torchrun pass --device cuda (each rank takes "
            "cuda:LOCAL_RANK) or --device cpu"
        )
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: CUDA is not available here")
        if local >= torch.cuda.device_count():
            raise TrainError(
                f"LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA device(s) here: "
                "start at most one process per GPU (--nproc_per_node)"
            )
    store = _meet(rank, world, addr, port)
    if kind == "cuda":
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=where)
        cpu_group = dist.new_group(backend="gloo")
    else:
        where = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        cpu_group = dist.group.WORLD
    return Dist(rank, world, local, cpu_group), where


def lost_peer(ctx: Dist, exc: BaseException) -> TrainError | None:
    """The one line to say for a collective that failed because another rank is gone (killed,
    its node lost): ``torchrun --max-restarts`` then starts the group again, and the run
    continues from its last checkpoint. None for any other error."""
    text = str(exc)
    if (
        not ctx.active
        or isinstance(exc, TrainError)
        or not (isinstance(exc, dist.DistError) or "gloo" in text or "NCCL" in text)
    ):
        return None
    return TrainError(
        f"rank {ctx.rank} lost contact with another rank ({text.splitlines()[0][:160]}); the "
        "work since the last checkpoint is lost. Under torchrun --max-restarts the group "
        "starts again and continues from it; else run the same command again"
    )


def teardown(ctx: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
