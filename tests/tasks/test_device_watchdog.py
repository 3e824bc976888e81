"""A worker whose generation outlived its deadline: not ready, and a warm shutdown that exits 70."""


def test_a_hung_generation_makes_the_worker_not_ready_and_asks_for_exit_70(monkeypatch):
    from celery.worker import state as worker_state

    from stems.batching import GenerationTimeout
    from tasks import device_watchdog, metrics

    monkeypatch.setattr(device_watchdog, "not_ready_reason", None)
    monkeypatch.setattr(worker_state, "should_stop", None)
    assert device_watchdog.readiness() == {"ready": True}
    device_watchdog.generation_hung(GenerationTimeout("ran past its deadline of 2 s"))
    assert device_watchdog.readiness() == {
        "ready": False, "not_ready_reason": "generation hung: ran past its deadline of 2 s"}
    assert worker_state.should_stop == device_watchdog.EXIT_HUNG == 70
    assert metrics.WORKER_READY._value.get() == 0
    metrics.worker_ready(True)
