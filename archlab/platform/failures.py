"""Which training failures are retried: transient faults (a lost worker or node) are, user
errors (a non-finite loss, a bad config) are not: they fail the same way every time.

Ray Train V2's FailureConfig retries any worker error up to `max_failures` and Ray 2.60
has no public hook for a failure policy, so `TorchTrainer` here hands the controller a
policy that raises at once when a worker failed with a terminal error and otherwise
decides as Ray's DefaultFailurePolicy does. `fit_trainer` turns that raise into
`TrialFailed`, which the Tune layer (sweep.train_driver_fn) ends as a FAILED trial without
raising, so Tune does not retry it either.
"""

from __future__ import annotations

import signal

from archlab.architectures.registry import ArchConfigError
from archlab.platform.config import ConfigError

# deterministic errors: the same input fails the same way on every retry
TERMINAL_ERRORS: tuple[type[BaseException], ...] = (FloatingPointError, ConfigError, ArchConfigError)


class TrialFailed(RuntimeError):
    """A training run ended by a terminal (user) error; the message is one line."""


def _base_exception(err: BaseException) -> BaseException:
    # workers' exceptions arrive wrapped in UserExceptionWithTraceback (its _base_exc)
    return getattr(err, "_base_exc", err)


def terminal_failure(training_failed_error: BaseException) -> BaseException | None:
    """The first worker failure that is a terminal error, or None (a transient fault)."""
    failures = getattr(training_failed_error, "worker_failures", None) or {}
    for rank in sorted(failures):
        base = _base_exception(failures[rank])
        if isinstance(base, TERMINAL_ERRORS):
            return base
    return None


def describe(err: BaseException) -> str:
    """One line: the error type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def failure_policy(failure_config):
    """Ray's DefaultFailurePolicy for `failure_config`, except that a worker failure with
    a terminal error is raised at once (never retried)."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    class _TerminalAwarePolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if terminal_failure(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return _TerminalAwarePolicy(failure_config)


def trainer_class():
    """TorchTrainer whose controller does not retry terminal errors (see module doc)."""
    from ray.train.torch import TorchTrainer

    class ArchlabTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs):
            # the one place Ray builds the controller's policy (DataParallelTrainer.fit)
            kwargs["failure_policy"] = failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

        def _register_sigint_handler(self, controller):
            # Ray's handler aborts the controller and lets fit() return as if training had
            # ended; archlab's own (install_signal_handlers) raises instead, so the job
            # ends its runs KILLED and nothing is registered from an interrupted run
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return
            super()._register_sigint_handler(controller)

    return ArchlabTorchTrainer


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver: the job stops and its runs end KILLED."""


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread, so every `finally` and
    `ends_runs_on_exit` runs (Tune and Train would otherwise swallow SIGINT and return
    as if the job had finished; SIGTERM would end the process without either)."""
    import os

    def handler(signum, frame):
        global last_signal
        last_signal = signal.Signals(signum).name
        raise Interrupted(f"interrupted by {last_signal}")

    global _installed
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by tune.run at each fit
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    _installed = handler


_installed = None  # the handler install_signal_handlers set, if it ran in this process
# the last signal that handler received: Ray Train's controller loop catches the
# Interrupted raised inside it and re-raises a bare KeyboardInterrupt, which loses the name
last_signal: str | None = None


def reinstall_signal_handlers() -> None:
    """Put archlab's handlers back after a library replaced them (ray.init sets its own
    SIGTERM handler, which exits with status 1 and skips the runs' KILLED ending). Does
    nothing where install_signal_handlers never ran (library use, tests, Ray workers)."""
    import threading

    if _installed is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _installed)
        signal.signal(signal.SIGTERM, _installed)
