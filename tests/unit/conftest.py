"""Unit tests are hermetic: each starts with no plugins installed in this process, whatever
an in-process server of the integration tests installed before (plugin tests install
their own registry on top)."""

from collections.abc import Iterator

import pytest
import redis

from service.plugins.registry import EMPTY, install, installed


@pytest.fixture(autouse=True)
def no_plugins() -> Iterator[None]:
    before = installed()
    install(EMPTY)
    yield
    install(before)


@pytest.fixture
def url(redis_url: str, request: pytest.FixtureRequest) -> str:
    """The URL of the session Redis's database ``DB`` of the test's module (a module of
    Redis unit tests sets ``DB``: its own database, as some read whole key sets), emptied."""
    db: int = request.module.DB
    url = f"{redis_url.rsplit('/', 1)[0]}/{db}"
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    return url


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    """A client of ``url`` that decodes replies to str."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        yield client
