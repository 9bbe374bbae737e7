import types

import fitserve


def test_all_lists_exactly_the_public_members():
    public = {
        name
        for name, value in vars(fitserve).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }

    assert set(fitserve.__all__) == public | {"__version__"}
    assert fitserve.__all__ == sorted(fitserve.__all__)


def test_public_members_say_they_live_in_fitserve():
    for name in fitserve.__all__:
        member = getattr(fitserve, name)
        if not isinstance(member, str):
            assert member.__module__ == "fitserve", name
