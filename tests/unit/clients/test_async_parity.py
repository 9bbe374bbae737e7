"""AsyncClient has every call Client has, with the same parameters."""

from __future__ import annotations

import inspect

import fitserve

# Client's own plumbing and context-manager methods, not calls
_NOT_CALLS = {"close"}


def _calls(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in _NOT_CALLS
    }


def test_async_client_has_every_call_of_client_with_the_same_parameters() -> None:
    sync, asynchronous = _calls(fitserve.Client), _calls(fitserve.AsyncClient)
    assert sorted(set(sync) - set(asynchronous)) == []
    for name, signature in sync.items():
        assert list(asynchronous[name].parameters) == list(signature.parameters), name
        for parameter in signature.parameters.values():
            other = asynchronous[name].parameters[parameter.name]
            assert (other.kind, other.default) == (parameter.kind, parameter.default), (
                f"{name}({parameter.name})"
            )
