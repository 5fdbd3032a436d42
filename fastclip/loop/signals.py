"""How a run is asked to stop: SIGINT (Ctrl-C), SIGTERM (`kill`, SLURM's preemption) and SIGUSR2
(Submitit's notice before a time limit) reach fit() as a request to stop after the step in
progress, once its checkpoint is written (`StopRequests`, `stopped`). A loader worker leaves those
signals to the training process: its side is fastclip/worker_signals.py (`ignore_stop_signals`),
below data/ and tasks/, which build the loaders."""
import logging
import signal
import threading
from pathlib import Path

from fastclip import distributed
from fastclip.loop.state import TrainState

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGUSR2: the run stopped after a step, its checkpoint written (the message says where)."""


class StopRequests:
    """While fit() runs, SIGINT (Ctrl-C), SIGTERM (`kill`, SLURM's preemption) and SIGUSR2 (the
    notice Submitit asks SLURM to send before a time limit) ask the loop to stop after the step in
    progress, once its checkpoint is written. A second Ctrl-C stops at once (KeyboardInterrupt); a
    scheduler's further signals do not (SLURM sends SIGTERM at the limit, then waits KillWait before
    SIGKILL: time to finish the step and its checkpoint). Handlers are installed only in the main
    thread and restored on exit; then `hand_over()` gives a SIGUSR2, if one came, to the handler that
    was there before (Submitit's: it requeues the job and exits)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ())

    def __init__(self):
        self.received: int | None = None  # the first
        self.all: set[int] = set()
        self._previous: dict = {}
        self._handed: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._handed, self._previous = self._previous, {}

    def handing_over(self) -> bool:
        """Whether hand_over() passes a SIGUSR2 on (one came, and a handler was there before fit)."""
        usr2 = getattr(signal, "SIGUSR2", None)
        return usr2 in self.all and callable(self._handed.get(usr2))

    def hand_over(self) -> None:
        """After the stop's checkpoint (and __exit__): a SIGUSR2 goes on to the handler installed before
        fit (Submitit's requeues the job and exits the process); nothing else does."""
        usr2 = getattr(signal, "SIGUSR2", None)
        previous = self._handed.get(usr2)
        if self.handing_over():
            log.info("handing SIGUSR2 on to %s (the job's requeue)", getattr(previous, "__qualname__", previous))
            previous(usr2, None)

    def requested(self, agree: bool = True) -> bool:
        """Whether the run stops now: a signal came to this process or, data-parallel, to any rank
        (one host all-reduce, so every rank stops after the same step). agree=False, data-parallel:
        False without asking the others (fit asks every tracking.log_every steps only: a host
        collective each step would hold every rank to the slowest one's host, and a stop waits at
        most log_every steps, well inside SLURM's KillWait or Submitit's signal_delay_s)."""
        if not agree and distributed.current().distributed:
            return False
        return distributed.any_rank(self.received is not None)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.all:  # a second Ctrl-C: now
            self.__exit__()
            raise KeyboardInterrupt
        self.all.add(signum)
        if self.received is not None:
            log.warning("%s received as well: still stopping after the step in progress", signal.Signals(signum).name)
            return
        self.received = signum
        log.warning("%s received: the run stops after the step in progress, once its checkpoint is written "
                    "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)",
                    signal.Signals(signum).name)


def stopped(stop: StopRequests, state: TrainState, ckpt_path: Path):
    """The run stops at a checkpoint written for this state: a SIGUSR2 goes on to the handler from
    before fit (Submitit's requeues the job and exits the process), else RunInterrupted."""
    stop.__exit__()
    usr2 = getattr(signal, "SIGUSR2", None)
    if usr2 is not None and distributed.any_rank(usr2 in stop.all):  # the job's notice reached some rank: requeue
        stop.all.add(usr2)
    why = signal.Signals(stop.received).name if stop.received else "another data-parallel rank's stop signal"
    message = (f"{why}: stopped after step {state.step}; its checkpoint is {ckpt_path}: "
               f"`trainer.resume=` it (or `trainer.resume=auto` with the same run dir) to continue")
    log.warning(message)  # said before the hand-over too, which exits the process
    if not distributed.current().main and stop.handing_over():
        raise SystemExit(0)  # rank 0 requeues the job; a failing exit here could end the job step before it does
    stop.hand_over()
    raise RunInterrupted(message)
