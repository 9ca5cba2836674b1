"""The compute thread: the one thread that runs MLX work, one job at a time.

Model loads and generations run here in arrival order, so MLX is never used
from two threads at once and generations do not compete for the device (a
concurrency of one, like the existing runtime's default). The read loop
stays free to answer `cancel`, `runtime/info` and the like meanwhile.

Only the read loop submits jobs, so checking `has_room` and then submitting
cannot race with another producer.
"""

import logging
import queue
import threading
from typing import Protocol

import mlx.core as mx

log = logging.getLogger(__name__)


class Job(Protocol):
    def run(self) -> None:
        """Do the work; must report its own outcome (reply or notification)."""

    def abandon(self) -> None:
        """Report that the job will never run (the runtime is stopping)."""


class ComputeQueue:
    """A bounded FIFO of jobs and the daemon thread that runs them.

    `_jobs` holds at most `jobs_max` jobs plus the stop sentinel (None), so
    `stop` can always enqueue the sentinel. `_stopping` makes the thread
    abandon, not run, whatever is still queued at shutdown.
    """

    def __init__(self, jobs_max: int):
        assert jobs_max > 0
        self._jobs_max = jobs_max
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        # Daemon, so a load still running after the shutdown grace cannot keep
        # the process alive.
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def has_room(self) -> bool:
        return self._jobs.qsize() < self._jobs_max

    def submit(self, job: Job) -> None:
        assert self.has_room(), "callers check has_room first"
        assert not self._stopping.is_set(), "no jobs are submitted after stop"
        self._jobs.put_nowait(job)

    def stop(self, grace_seconds: float) -> bool:
        """Abandon queued jobs, let the running one end. True if it ended in time."""
        self._stopping.set()
        self._jobs.put_nowait(None)
        self._thread.join(grace_seconds)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._run_jobs()
        finally:
            # MLX does not tear down a thread's streams safely at process exit
            # (an intermittent "terminate called without an active exception");
            # its maintainers ask each thread to release them itself.
            mx.clear_streams()

    def _run_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._stopping.is_set():
                    job.abandon()
                else:
                    job.run()
            except Exception:
                # Jobs report their own failures; reaching here is a bug, but the
                # thread must survive it or every later request would hang.
                log.exception("compute job raised")
