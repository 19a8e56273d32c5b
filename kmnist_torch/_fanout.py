"""Work spread over worker processes, one per device, that stop when the command that started
them stops: the harness's ``--devices`` (:mod:`kmnist_torch.reproduce`).

Each worker is a spawned process (CUDA needs a fresh one) in a process group of its own, so a
terminal's Ctrl-C reaches the command alone, and the command passes every SIGINT or SIGTERM it
gets on to each worker, exactly once: a worker then stops as the command would (a trainer after
its step, with a checkpoint; a second signal aborts). A worker whose command died without
passing anything on (``kill -9``, a closed terminal) stops the same way by itself, and exits.
A worker that dies (a crash, ``kill -9``, the out-of-memory killer) fails only the item it was
running: a fresh worker takes its place for the next.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Any, Callable

from ._args import STOP_SIGNALS, Stopped, stop_on_signals

# In a worker: the command's stop flag (the signal that stopped it, 0 while none did),
# whether an item is under way, and the stop signals it started with blocked (see _init).
_worker: dict[str, Any] = {"stop": None, "busy": False, "started_blocked": frozenset()}


def _mask_stop_signals(block: bool) -> frozenset[int]:
    """Block or unblock the stop signals in the calling thread, where the platform has
    signal masks (POSIX); the thread's blocked signals before."""
    if not hasattr(signal, "pthread_sigmask"):
        return frozenset()
    how = signal.SIG_BLOCK if block else signal.SIG_UNBLOCK
    return frozenset(signal.pthread_sigmask(how, STOP_SIGNALS))


def _init(stop: Any, pids: Any, slot: int, parent: int) -> None:
    """A worker's start: its own process group, its pid where the command reads it, signals
    ignored while it waits for an item, and a watch on its command. The worker was started
    with the stop signals blocked (its serving thread's mask, kept across the spawn), so a
    terminal's Ctrl-C that reached the command's group while the worker was still importing
    waited; ignored now, it is dropped as they are unblocked (the command passes every signal
    on to its workers itself)."""
    _worker["stop"] = stop
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _worker["started_blocked"] = _mask_stop_signals(block=False)
    pids[slot] = os.getpid()  # only now: a signal passed on sooner would end the worker
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()


def _watch(parent: int) -> None:
    """Once the command is gone: stop the item under way as SIGTERM does, then exit."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # ignored between items
    while _worker["busy"]:
        time.sleep(0.2)
    os._exit(128 + signal.SIGTERM)


def _call(work: Callable[[Any, str], Any], item: Any, device: str) -> Any:
    """``work(item, device)`` in a worker, with SIGINT and SIGTERM raising
    :class:`~kmnist_torch._args.Stopped` (as in the command itself)."""
    _worker["busy"] = True
    try:
        with stop_on_signals():
            if _worker["stop"].value:  # the command stopped before this item began
                raise Stopped(_worker["stop"].value)
            return work(item, device)
    finally:
        _worker["busy"] = False


def spread(
    items: list[Any],
    devices: list[str],
    work: Callable[[Any, str], Any],
    done: Callable[[int, Any, str], None],
) -> None:
    """Call ``work(item, device)`` (picklable) for the items, in one worker process per
    device, each worker taking the next item when it finishes one.

    ``done(i, result, device)`` is called in this process, one item at a time, as each
    finishes: ``result`` is what ``work`` returned, or the exception that ended it (a
    :class:`~kmnist_torch._args.Stopped` for an item stopped before it began, or
    ``BrokenProcessPool`` for one whose worker died under it: that item alone, a fresh worker
    takes the next). A signal stops every worker (see the module) and, once each has
    stopped, is raised here as :class:`~kmnist_torch._args.Stopped`; items not begun by then
    are never done. What ``done`` raises (a full disk writing the outputs) starts no new
    item either, and is raised here once the items under way have finished."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(items)):
        todo.put(i)
    lock = threading.Lock()
    spawn = multiprocessing.get_context("spawn")
    stop, pids = spawn.RawValue("i", 0), spawn.RawArray("i", len(devices))
    failed: list[BaseException] = []  # what done() raised: no item starts after it

    def new_pool(k: int) -> concurrent.futures.ProcessPoolExecutor:  # the worker of slot k
        init = (stop, pids, k, os.getpid())
        return concurrent.futures.ProcessPoolExecutor(1, spawn, _init, init)

    pools = [new_pool(k) for k in range(len(devices))]

    def serve(k: int, device: str) -> None:
        # Workers start from this thread and keep its mask until their _init (see there);
        # this process's signals go to its main thread, which never blocks them.
        _mask_stop_signals(block=True)
        while not (stop.value or failed):
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            result = _run_one(pools, k, lambda: new_pool(k), pids, work, items[i], device)
            try:
                with lock:
                    done(i, result, device)
            except BaseException as exc:  # noqa: BLE001 - raised in the command's thread
                failed.append(exc)
                return

    serving = [
        threading.Thread(target=serve, args=(k, d), daemon=True) for k, d in enumerate(devices)
    ]
    try:
        stopped = _wait(serving, stop, pids)
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        raise failed[0]
    if stopped is not None:
        raise stopped


def _run_one(
    pools: list[concurrent.futures.ProcessPoolExecutor],
    k: int,
    new_pool: Callable[[], concurrent.futures.ProcessPoolExecutor],
    pids: Any,
    work: Callable[[Any, str], Any],
    item: Any,
    device: str,
) -> Any:
    """``work(item, device)`` in the worker of ``pools[k]``: its result, or the exception that
    ended it. A worker that dies under its item (a crash, ``kill -9``, the out-of-memory
    killer) fails that item alone (``BrokenProcessPool``): a fresh worker takes the next one.
    One found dead before the item began is replaced and the item given to its successor."""
    for _ in range(2):
        try:
            future = pools[k].submit(_call, work, item, device)
        except concurrent.futures.process.BrokenProcessPool:
            _replace(pools, k, new_pool, pids)  # died while idle: the item never began
            continue
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool as exc:  # died under this item
            _replace(pools, k, new_pool, pids)
            return exc
        except (Exception, Stopped) as exc:  # stopped before it began, or the item's error
            return exc
    return concurrent.futures.process.BrokenProcessPool(f"no worker would start on {device}")


def _replace(
    pools: list[concurrent.futures.ProcessPoolExecutor],
    k: int,
    new_pool: Callable[[], concurrent.futures.ProcessPoolExecutor],
    pids: Any,
) -> None:
    """Put a fresh worker in place of the dead one of ``pools[k]`` (no signal is passed on to
    the dead one's pid meanwhile: it may be another process's by now)."""
    pids[k] = 0
    pools[k].shutdown(wait=False, cancel_futures=True)
    pools[k] = new_pool()


def _wait(serving: list[threading.Thread], stop: Any, pids: Any) -> Stopped | None:
    """Wait for the serving threads; pass each signal on to every worker, once, meanwhile.
    The first signal's :class:`~kmnist_torch._args.Stopped`, or None."""
    stopped: Stopped | None = None
    for t in serving:
        t.start()
    for t in serving:
        while t.is_alive():
            try:
                t.join(0.5)  # a timed join lets a signal through
            except Stopped as exc:  # pass it on, once to each worker; wait for them
                stopped, stop.value = stopped or exc, exc.signum
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        if pid:
                            os.kill(pid, exc.signum)
    return stopped
