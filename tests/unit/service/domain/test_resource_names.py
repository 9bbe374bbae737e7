import pytest

from service.domain.resource_names import check_alias, check_name
from service.errors import InvalidRequest


@pytest.mark.parametrize("name", ["mnist", "m", "0model", "a.b_c-d", "x" * 63, "v1.2"])
def test_valid_names_are_returned_unchanged(name):
    assert check_name(name, "model_name") == name


@pytest.mark.parametrize(
    "name",
    ["", "Mnist", "-lead", ".lead", "_lead", "a/b", "../etc", "a..b", "x" * 64, "sp ace", "é"],
)
def test_invalid_names_are_refused_with_the_field_and_the_rule(name):
    with pytest.raises(InvalidRequest) as info:
        check_name(name, "header.name", "dataset name")

    assert info.value.field == "header.name"
    assert repr(name) in info.value.message
    assert "not a valid dataset name" in info.value.message
    assert "1-63 characters" in info.value.message


@pytest.mark.parametrize("alias", ["stable", "canary-2", "a", "b." + "x" * 61])
def test_valid_aliases_are_returned_unchanged(alias):
    assert check_alias(alias) == alias


@pytest.mark.parametrize("alias", ["", "1st", "Stable", "a/b", "a..b", "-x", "x" * 64])
def test_invalid_aliases_are_refused(alias):
    with pytest.raises(InvalidRequest) as info:
        check_alias(alias, field="alias")

    assert info.value.field == "alias"
    assert "starting with a letter" in info.value.message


def test_latest_is_a_reserved_alias():
    with pytest.raises(InvalidRequest, match="'latest' is reserved") as info:
        check_alias("latest")

    assert info.value.field == "alias"
