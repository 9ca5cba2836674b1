"""The compute thread: the one thread that runs MLX work.

Model loads and generations run here, so MLX is never used from two threads
at once; the read loop stays free to answer `cancel`, `runtime/info` and the
like meanwhile, and never calls MLX itself. It hands work over as commands
on a queue: a model load, a stream to insert into its model's stepper, a
stream to remove (cancelled).

The loop: take every command already queued (without waiting, so a new
stream waits at most one step), then step every model that has streams
once, in turn (`batching.Steppers`), and again; with no stream live it
waits on the queue instead. A load runs to its end inside the loop, so
streams pause while a model loads.

Only the read loop submits commands, so checking `has_room` and then
submitting cannot race with another producer. Removals are not bounded by
`has_room`: there is at most one per live stream (see `StreamRegistry.cancel`).
"""

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from .batching import Steppers
from .streams import Stream, StreamRegistry

log = logging.getLogger(__name__)


class Job(Protocol):
    def run(self) -> None:
        """Do the work; must report its own outcome (reply or notification)."""

    def abandon(self) -> None:
        """Report that the job will never run (the runtime is stopping)."""


@dataclass
class Insert:
    """Hand an admitted stream to its model's stepper."""

    stream: Stream


@dataclass
class Remove:
    """Take a cancelled stream out of its model's stepper."""

    stream: Stream


Command = Job | Insert | Remove


class ComputeQueue:
    """A bounded queue of commands and the daemon thread that carries them out.

    `_commands` holds at most `jobs_max` jobs and inserts, plus removals and
    the stop sentinel (None). `_stopping` makes the thread abandon, not run,
    whatever is still queued at shutdown.
    """

    def __init__(self, jobs_max: int, steppers: Steppers, registry: StreamRegistry):
        assert jobs_max > 0
        self._jobs_max = jobs_max
        self._commands: queue.Queue[Command | None] = queue.Queue()
        self._bounded = 0
        self._bounded_lock = threading.Lock()
        self._steppers = steppers
        self._registry = registry
        self._stopping = threading.Event()
        # Daemon, so a load still running after the shutdown grace cannot keep
        # the process alive.
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)

    @property
    def steppers(self) -> Steppers:
        return self._steppers

    def start(self) -> None:
        self._thread.start()

    def has_room(self) -> bool:
        with self._bounded_lock:
            return self._bounded < self._jobs_max

    def submit(self, command: Command) -> None:
        assert not self._stopping.is_set(), "nothing is submitted after stop"
        if not isinstance(command, Remove):
            with self._bounded_lock:
                assert self._bounded < self._jobs_max, "callers check has_room first"
                self._bounded += 1
        self._commands.put_nowait(command)

    def stop(self, grace_seconds: float) -> bool:
        """Abandon queued jobs, end live streams, let a running load end. True if in time."""
        self._stopping.set()
        self._commands.put_nowait(None)
        self._thread.join(grace_seconds)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX does not tear down a thread's streams safely at process exit
            # (an intermittent "terminate called without an active exception");
            # its maintainers ask each thread to release them itself.
            mx.clear_streams()

    def _loop(self) -> None:
        while True:
            if not self._take_commands(wait=not self._steppers.busy()):
                break
            try:
                self._steppers.step_all()
            except Exception:
                # Steppers report their own failures; reaching here is a bug,
                # but the thread must survive it or every stream would hang.
                log.exception("a generation step raised")
        # Shutdown: every stream still live ends cancelled (cancel_all flagged them).
        self._steppers.end_all(None)
        self._drain_abandoning()

    def _take_commands(self, wait: bool) -> bool:
        """Carries out the queued commands (waiting for one if `wait`); False at stop."""
        while True:
            try:
                command = self._commands.get(block=wait)
            except queue.Empty:
                return True
            wait = False
            if command is None or self._stopping.is_set():
                if command is not None:
                    self._abandon(command)
                return False
            self._carry_out(command)

    def _carry_out(self, command: Command) -> None:
        if not isinstance(command, Remove):
            with self._bounded_lock:
                self._bounded -= 1
        try:
            if isinstance(command, Insert):
                if self._registry.start(command.stream):
                    self._steppers.insert(command.stream)
                # Otherwise it was cancelled while queued; `cancel` sent its event.
            elif isinstance(command, Remove):
                self._steppers.remove(command.stream)
            else:
                command.run()
        except Exception:
            # Commands report their own failures; reaching here is a bug.
            log.exception("compute command raised")

    def _abandon(self, command: Command) -> None:
        if isinstance(command, (Insert, Remove)):
            # Shutdown cancels every queued stream (and sends its event) before
            # stopping, and running ones end in `end_all`.
            return
        try:
            command.abandon()
        except Exception:
            log.exception("abandoning a compute job raised")

    def _drain_abandoning(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                self._abandon(command)
