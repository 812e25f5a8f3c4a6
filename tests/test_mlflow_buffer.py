"""MlflowBuffer: worker-side MLflow writes never wait on the server, survive an outage,
and are all delivered in order; against a fake client (fast) and a real server that is
stopped and restarted (slow)."""

from __future__ import annotations

import threading
import time

import pytest

from archlab.platform.mlflow_buffer import MlflowBuffer


class FakeRun:
    def __init__(self, params):
        self.data = type("D", (), {"params": params})()


class FakeClient:
    """Refuses every call while `down` is set; while `hang` is set a call blocks until it
    is cleared (an unreachable server that does not even refuse)."""

    def __init__(self, down: bool = False):
        self.down, self.hang, self.in_call = threading.Event(), threading.Event(), threading.Event()
        if down:
            self.down.set()
        self.metrics, self.params, self.calls, self.failed = [], {}, 0, 0

    def _maybe_fail(self):
        self.calls += 1
        self.in_call.set()
        while self.hang.is_set():
            time.sleep(0.01)
        if self.down.is_set():
            self.failed += 1
            raise ConnectionError("connection refused")

    def get_run(self, run_id):
        self._maybe_fail()
        return FakeRun(dict(self.params))

    def log_batch(self, run_id, metrics=(), params=()):
        self._maybe_fail()
        assert len(metrics) <= 1000 and len(params) <= 100
        self.metrics.extend(metrics)
        for p in params:
            assert p.key not in self.params
            self.params[p.key] = p.value


def test_writes_during_an_outage_never_block_and_all_arrive_in_order():
    c = FakeClient(down=True)
    c.hang.set()  # the first send blocks inside the client
    buf = MlflowBuffer(c, "run1", flush_every_s=0.05, first_backoff_s=0.05, max_backoff_s=0.2)
    buf.log_metrics({"val_loss": 1.0, "epoch": 1}, step=1)
    assert c.in_call.wait(timeout=30)  # the thread is stuck in a call to the server

    def worker():  # a training loop logging while that call hangs
        for step in range(2, 301):
            buf.log_metrics({"val_loss": 1.0 / step, "epoch": step, "skipped": "text"}, step=step)
        buf.log_params({"n_params": 123, "device": "cpu"})

    w = threading.Thread(target=worker)
    w.start()
    w.join(timeout=60)
    assert not w.is_alive()  # logging never waited on the hanging call
    c.hang.clear()  # the server now refuses instead of hanging
    deadline = time.monotonic() + 30
    while c.failed < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.failed >= 3 and not c.metrics  # it kept retrying, nothing accepted yet
    assert not buf.flush(timeout_s=0.2)  # a bounded flush gives up while the server is down
    c.down.clear()  # the server is back
    assert buf.close(timeout_s=30) == 0
    steps = [m.step for m in c.metrics if m.key == "val_loss"]
    assert steps == list(range(1, 301))  # each once, in order
    assert {m.key for m in c.metrics} == {"val_loss", "epoch"}  # non-numbers are not metrics
    assert c.params == {"n_params": "123", "device": "cpu"}
    assert buf.failures >= 3 and buf.sent == 602


def test_metric_timestamps_are_taken_when_logged_not_when_sent():
    c = FakeClient(down=True)
    buf = MlflowBuffer(c, "r", flush_every_s=0.05, first_backoff_s=0.05, max_backoff_s=0.1)
    before = int(time.time() * 1000)
    buf.log_metrics({"a": 1.0}, step=1)
    time.sleep(0.5)
    c.down.clear()
    buf.close(timeout_s=10)
    assert before <= c.metrics[0].timestamp <= before + 200


def test_params_the_run_already_has_are_not_sent_again():
    c = FakeClient()
    c.params = {"n_params": "123"}  # a restarted worker's run
    buf = MlflowBuffer(c, "r", flush_every_s=0.05)
    buf.log_params({"n_params": 123, "world_size": 2})
    buf.close(timeout_s=10)
    assert c.params == {"n_params": "123", "world_size": "2"}


def test_close_gives_up_after_its_timeout_and_counts_what_was_lost():
    c = FakeClient(down=True)
    buf = MlflowBuffer(c, "r", flush_every_s=0.05, first_backoff_s=0.05, max_backoff_s=0.1)
    buf.log_metrics({"a": 1.0, "b": 2.0}, step=1)
    t0 = time.perf_counter()
    assert buf.close(timeout_s=0.5) == 2
    assert time.perf_counter() - t0 < 8


def test_overflow_drops_the_oldest_and_says_so():
    c = FakeClient(down=True)
    buf = MlflowBuffer(c, "r", flush_every_s=0.05, first_backoff_s=0.05, max_backoff_s=0.1, max_items=5)
    for step in range(1, 9):
        buf.log_metrics({"a": float(step)}, step=step)
    c.down.clear()
    lost = buf.close(timeout_s=10)
    # up to one batch may have been in flight (out of the queue) when the overflow happened
    assert lost == buf.dropped >= 2
    assert [m.step for m in c.metrics] == sorted(m.step for m in c.metrics)
    assert c.metrics[-1].step == 8


def test_a_refused_batch_is_dropped_not_retried_forever():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class Refusing(FakeClient):
        def log_batch(self, run_id, metrics=(), params=()):
            self.calls += 1
            raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)

    c = Refusing()
    buf = MlflowBuffer(c, "r", flush_every_s=0.05)
    buf.log_metrics({"a": 1.0}, step=1)
    assert buf.close(timeout_s=5) == 1 and c.calls == 1


@pytest.mark.slow
def test_real_server_stopped_and_restarted_loses_nothing(tmp_path, monkeypatch):
    """A real `mlflow server` goes down mid-run: logging does not wait, and after it comes
    back (same store, same port) every metric is there."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import free_port, start_mlflow_server, stop_group

    # fail fast inside each request, so the buffer's own retry loop is what is tested
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def start(i):
        proc = start_mlflow_server(tmp_path, port, f"server-{i}")
        if proc is None:
            pytest.fail(f"mlflow server did not start on port {port}: {(tmp_path / f'server-{i}.log').read_text()[-500:]}")
        return proc

    proc = start(0)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("buffer")).info.run_id
    buf = MlflowBuffer(client, run_id, flush_every_s=0.2, first_backoff_s=0.5, max_backoff_s=2.0)
    try:
        buf.log_metrics({"val_loss": 1.0}, step=1)
        assert buf.flush(timeout_s=60)
        stop_group(proc, timeout=20)  # the outage
        slowest = 0.0
        for step in range(2, 12):
            t0 = time.perf_counter()
            buf.log_metrics({"val_loss": 1.0 / step}, step=step)
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.3)
        assert slowest < 0.1 and buf.failures >= 1
        proc = start(1)
        assert buf.close(timeout_s=120) == 0
        hist = MlflowClient(uri).get_metric_history(run_id, "val_loss")
        assert sorted(m.step for m in hist) == list(range(1, 12))
    finally:
        stop_group(proc, timeout=20)
