"""A loader worker's signals: the worker_init_fn every DataLoader of the project passes
(`ignore_stop_signals`), so that a stop signal sent to the whole process group is the training
process's to handle (fit() stops after the step in progress; fastclip/loop/signals.py).

Why a module of its own, at the bottom of the package: the loaders are built by data/ (evaluation
sets) and tasks/ (training), layers below the loop; they import this, and it imports nothing of the
project."""
import os
import signal
import threading

WORKER_STOP_GRACE_S = 60.0


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A loader worker's init. Ctrl-C and SIGUSR2, sent to the whole process group (a terminal, SLURM),
    are the training process's to handle: a worker that died of them would fail the batch the run
    needs to finish its step. SIGTERM: from the training process (the loader ending a hung worker,
    multiprocessing at exit) the worker leaves at once; from anyone else (a scheduler stopping the
    whole job) it leaves WORKER_STOP_GRACE_S later, time for the training process to finish its step
    and checkpoint (which ends the worker sooner, as the loader always does). SIGTERM is taken by a
    thread (sigwaitinfo names the sender), so this holds while the worker's main thread is busy."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_watch_sigterm, args=(os.getppid(),), daemon=True, name="sigterm").start()


def _watch_sigterm(parent: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent:
            os._exit(0)
        timer = threading.Timer(WORKER_STOP_GRACE_S, os._exit, args=(0,))
        timer.daemon = True
        timer.start()
