"""Unit tests are hermetic: each starts with no plugins installed in this process, whatever
an in-process server of the integration tests installed before (plugin tests install
their own registry on top)."""

from collections.abc import Iterator

import pytest

from service.plugins.registry import EMPTY, install, installed


@pytest.fixture(autouse=True)
def no_plugins() -> Iterator[None]:
    before = installed()
    install(EMPTY)
    yield
    install(before)
