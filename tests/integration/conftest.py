import pytest

from tests.harness import (
    CallbackReceiver,
    service_env,
    start_gateway,
    start_worker,
)


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def receiver():
    with CallbackReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    """Gateway + worker on the Redis broker, tiny model, Azurite, loopback callback receiver."""
    tmp = tmp_path_factory.mktemp("stack")
    env = service_env(tmp, DEFAULT_CALLBACK_URL=receiver.url)
    worker = start_worker(env, tmp)
    try:
        gateway, base = start_gateway(env, tmp)
        try:
            yield {"base": base, "env": env, "worker": worker, "gateway": gateway, "tmp": tmp}
        finally:
            gateway.stop()
    finally:
        worker.stop()
