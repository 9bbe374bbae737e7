"""How worker failures are classified: user errors with a reason, anything else a bug."""

import re

import tensorflow as tf

from service.errors import InvalidRequest
from service.training import failures
from service.training.plugins import PluginFailed


def test_memory_running_out_is_a_user_error_with_a_reason():
    for exc in (MemoryError(), tf.errors.ResourceExhaustedError(None, None, "OOM at /x.py")):
        known = failures.classified(exc)
        assert isinstance(known, failures.OutOfMemory)
        assert failures.reason_of(known) == "OUT_OF_MEMORY"
        assert "smaller fit.batch_size" in known.message
        assert "/x.py" not in known.message


def test_an_unexpected_exception_is_a_bug_reported_by_an_error_id_only():
    assert failures.classified(FileNotFoundError(2, "No such file", "/srv/data/x")) is None
    error_id = failures.new_error_id()
    assert re.fullmatch(r"[0-9a-f]{16}", error_id)
    message = failures.internal_message(error_id)
    assert error_id in message
    assert "/srv" not in message


def test_reasons_come_from_the_error_class():
    assert failures.reason_of(InvalidRequest("x")) == "INVALIDREQUEST"
    assert failures.reason_of(PluginFailed("x")) == "PLUGIN_FAILED"
