"""MLflow writes off the training path: the worker queues metrics and params, a background
thread sends them with `log_batch`, and `close()` flushes what is left at the end.

Why: a synchronous `log_batch` inside the epoch loop stalls every DDP worker (the others
wait at the next collective) for as long as the tracking server is unreachable: a 38 s
outage stalled the job 39 s (issue 11). With the buffer a step never waits on MLflow.

Delivery: items leave the queue only after the server accepted them. A failed send is
retried with exponential backoff (1 s doubling up to `max_backoff_s`, 30 s by default),
for as long as the buffer lives, so an outage of any length loses nothing while:
- the buffer holds at most `max_items` entries (100,000 by default: ~5,000 epoch-end
  reports of ~20 metrics; about 20 MB). Beyond that the oldest are dropped, counted and
  logged; at the platform's rate (one report per epoch or checkpoint) that is days;
- `close(timeout_s)` waits at most `timeout_s` (600 s by default) for the last items:
  an outage that is still going on 10 minutes after the run ended loses what is queued,
  and `close` says how many (it returns the count; it never raises).
So: nothing is lost for an outage of up to 10 minutes at the end of a run, and of any
length before it, up to the buffer's size. MLflow's own HTTP client also retries each
request (MLFLOW_HTTP_REQUEST_MAX_RETRIES); those waits happen in the thread too.

Errors the server gives for bad requests (INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
INVALID_STATE: a value that can never be accepted) are not retried: that batch is dropped
with an error in the log, so one bad value cannot hold the rest back.

Metric timestamps are taken when the worker logs, not when the thread sends.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

log = logging.getLogger("archlab")

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def _permanent(e: Exception) -> bool:
    return getattr(e, "error_code", None) in PERMANENT_ERRORS


class MlflowBuffer:
    """Queue MLflow writes for one run and send them from a daemon thread.

    `client`: an MlflowClient (or anything with `log_batch(run_id, metrics=, params=)` and
    `get_run(run_id)`). `flush_every_s`: how often the thread sends without being asked."""

    def __init__(self, client, run_id: str, *, flush_every_s: float = 2.0, max_items: int = 100_000,
                 max_backoff_s: float = 30.0, first_backoff_s: float = 1.0):
        self.client, self.run_id = client, run_id
        self.flush_every_s, self.max_items = flush_every_s, max_items
        self.max_backoff_s, self.first_backoff_s = max_backoff_s, first_backoff_s
        self._metrics: collections.deque = collections.deque()
        self._params: dict[str, str] = {}
        self._lock = threading.Condition()
        self._in_flight = 0  # items taken by the thread and not yet accepted
        self._closing = False
        self.dropped = 0  # lost to overflow or to a permanent error
        self.failures = 0  # failed sends (each retried unless permanent)
        self.sent = 0
        from mlflow.entities import Metric, Param  # imported here, not on the first log call

        self._Metric, self._Param = Metric, Param
        self._thread = threading.Thread(target=self._run, name=f"mlflow-buffer-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ---- worker side: never blocks on the network ----

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        Metric = self._Metric
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        with self._lock:
            self._metrics.extend(items)
            over = len(self._metrics) + len(self._params) - self.max_items
            for _ in range(max(0, over)):
                self._metrics.popleft()
                self.dropped += 1
            if over > 0:
                log.error("MLflow buffer full (%d items): dropped the %d oldest metrics of run %s",
                          self.max_items, over, self.run_id)
            self._lock.notify_all()

    def log_params(self, params: dict[str, Any]) -> None:
        """Params the run does not have yet (a restarted worker logs the same ones again;
        the thread checks the run before sending)."""
        with self._lock:
            self._params.update({k: str(v) for k, v in params.items()})
            self._lock.notify_all()

    def pending(self) -> int:
        with self._lock:
            return len(self._metrics) + len(self._params) + self._in_flight

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far has been accepted (or `timeout_s` passed).
        True when the queue is empty."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            self._lock.notify_all()
            while self._metrics or self._params or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(timeout=min(left, 0.5) if left is not None else 0.5)
            return True

    def close(self, timeout_s: float = 600.0) -> int:
        """Flush and stop the thread. Returns the number of items lost (0 normally)."""
        done = self.flush(timeout_s)
        with self._lock:
            self._closing = True
            lost = len(self._metrics) + len(self._params) + self._in_flight
            self._lock.notify_all()
        self._thread.join(timeout=5.0)
        if not done:
            log.error("MLflow unreachable for %.0f s after the run ended: %d metric/param writes of run %s "
                      "were not delivered", timeout_s, lost, self.run_id)
        return lost + self.dropped

    # ---- the thread ----

    def _take(self) -> tuple[list, list]:
        Param = self._Param
        metrics = [self._metrics.popleft() for _ in range(min(len(self._metrics), MAX_METRICS_PER_BATCH))]
        keys = list(self._params)[:MAX_PARAMS_PER_BATCH]
        params = [Param(k, self._params.pop(k)[:6000]) for k in keys]
        self._in_flight = len(metrics) + len(params)
        return metrics, params

    def _put_back(self, metrics: list, params: list) -> None:
        self._metrics.extendleft(reversed(metrics))  # keep their order ahead of newer items
        for p in params:
            self._params.setdefault(p.key, p.value)
        self._in_flight = 0

    def _send(self, metrics: list, params: list) -> None:
        if params:
            existing = self.client.get_run(self.run_id).data.params
            params = [p for p in params if p.key not in existing]
        if metrics or params:
            self.client.log_batch(self.run_id, metrics=metrics, params=params)

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._lock:
                if not (self._metrics or self._params):
                    if self._closing:
                        return
                    self._lock.wait(timeout=self.flush_every_s)
                    continue
                if self._closing:
                    return  # close() already waited as long as it would
                metrics, params = self._take()
            try:
                self._send(metrics, params)
            except Exception as e:  # the server is down or refuses: keep the items
                self.failures += 1
                with self._lock:
                    if _permanent(e):
                        self.dropped += len(metrics) + len(params)
                        self._in_flight = 0
                        log.error("MLflow refused %d writes to run %s (%s); dropped them", len(metrics) + len(params),
                                  self.run_id, e)
                        self._lock.notify_all()
                        continue
                    self._put_back(metrics, params)
                    self._lock.notify_all()
                backoff = min(self.max_backoff_s, backoff * 2 if backoff else self.first_backoff_s)
                log.warning("MLflow write to run %s failed (%s: %s); retrying in %.1f s", self.run_id,
                            type(e).__name__, str(e)[:200], backoff)
                until = time.monotonic() + backoff
                with self._lock:  # new items or a flush() must not cut the backoff short
                    while not self._closing and (left := until - time.monotonic()) > 0:
                        self._lock.wait(timeout=left)
                continue
            backoff = 0.0
            with self._lock:
                self.sent += self._in_flight
                self._in_flight = 0
                self._lock.notify_all()
