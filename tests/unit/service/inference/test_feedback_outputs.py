"""Which output a Feedback scores."""

import pytest

from service.errors import InvalidRequest
from service.inference.feedback import _output

CLS = {"kind": "class", "values": [1, 2]}
REG = {"kind": "value", "values": [0.5, 1.5]}


def test_a_single_output_is_scored_without_being_named():
    record = {"model": "m", "version": 1, "outputs": {"output_0": CLS}}
    assert _output(record, "") == ("output_0", CLS)
    assert _output(record, "output_0") == ("output_0", CLS)


def test_a_multi_output_model_needs_the_output_named():
    record = {"model": "m", "version": 1, "outputs": {"cls": CLS, "reg": REG}}
    assert _output(record, "reg") == ("reg", REG)
    with pytest.raises(InvalidRequest, match=r"2 outputs \('cls', 'reg'\)"):
        _output(record, "")
    with pytest.raises(InvalidRequest, match="'other' is not an output"):
        _output(record, "other")


def test_a_record_kept_before_outputs_were_recorded_still_scores():
    record = {"model": "m", "version": 1, **CLS}
    name, summary = _output(record, "")
    assert (name, summary["values"]) == ("", [1, 2])
