"""The only owner of torch's CPU thread count: a process's budget, the per-epoch choice, the caller's count back."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

_thread_budget: int | None = None


def set_thread_budget(threads: int) -> None:
    """The CPU threads this process may use (its share when several workers share the machine)."""
    global _thread_budget
    _thread_budget = max(1, threads)
    torch.set_num_threads(_thread_budget)


class ThreadChooser:
    """Picks, every epoch, whether this process trains faster on all its CPU threads or on one.

    Load changes during a study (OpenMP threads wait on each other when another process is busy on the cores), so
    the first steps of each epoch are timed both ways and the rest runs on the faster (BENCHMARKS.md, "Threads").
    An explicit OMP_NUM_THREADS is left alone (set it to 1 for several workers on one machine).
    """

    def __init__(self, device: torch.device, probe_steps: int = 2) -> None:
        self.many = torch.get_num_threads()
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        self.many = _thread_budget or max(self.many, min(available, os.cpu_count() or 1))
        self.active = device.type == "cpu" and self.many > 1 and not os.environ.get("OMP_NUM_THREADS")
        self.probe_steps = probe_steps

    def plan(self, steps: int) -> list[int] | None:
        """Thread counts for the first steps of an epoch (warm-up, then each count timed), or None."""
        if not self.active or steps < 2 + 4 * self.probe_steps:
            return None
        return [self.many] * (1 + self.probe_steps) + [1] * (1 + self.probe_steps)

    def too_small(self, first_step_s: float) -> bool:
        """Steps of a few milliseconds (small MLPs) leave one core to the rest (the tracking process, another
        worker), without probing: switching per step to find out costs more than it saves."""
        if first_step_s < 0.02:
            self.active = False
            torch.set_num_threads(max(1, self.many - 1))
        return not self.active

    def choose(self, seconds: dict[int, float]) -> None:
        torch.set_num_threads(min(seconds, key=seconds.get))

    def use(self, threads: int) -> None:
        """Train the next steps on `threads` threads (the probe's switch)."""
        torch.set_num_threads(threads)


def fastest_threads(step: Callable[[], float]) -> float:
    """Keep torch's CPU thread count, or drop to one thread where that trains faster; returns s per step.

    Small models spend a step mostly in thread synchronisation. An explicit OMP_NUM_THREADS is left alone.
    """
    threads = torch.get_num_threads()
    if threads == 1 or os.environ.get("OMP_NUM_THREADS"):
        return min(step() for _ in range(3))
    many = min(step() for _ in range(3))
    torch.set_num_threads(1)
    one = min(step() for _ in range(3))
    if one <= many:
        return one
    torch.set_num_threads(threads)
    return many


def worker_share(workers: int) -> int:
    """The CPU threads each of `workers` processes on this machine may use."""
    return max(1, (os.cpu_count() or 1) // workers)


@contextlib.contextmanager
def callers_threads() -> Iterator[None]:
    """Trials pick their own thread counts; the caller gets its own back when the study ends, however it ends."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
