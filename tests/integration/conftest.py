import pytest

from tests.harness import CallbackReceiver, running_stack, service_env


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
    with running_stack(env, tmp) as (base, worker, gateway):
        yield {"base": base, "env": env, "worker": worker, "gateway": gateway, "tmp": tmp}
