"""Error messages reach people: no terminal escapes in them."""

from service.errors import InvalidRequest, plain_text

KERAS_STYLE = (
    "\x1b[1mValueError\x1b[0m: Arguments `target` and `output` must have the same shape. "
    "Received: target.shape=\x1b[31m(None, 1)\x1b[0m, output.shape=(None, 3)"
)


def test_terminal_escapes_are_stripped_and_the_text_kept():
    assert plain_text(KERAS_STYLE) == (
        "ValueError: Arguments `target` and `output` must have the same shape. "
        "Received: target.shape=(None, 1), output.shape=(None, 3)"
    )


def test_hyperlinks_and_cursor_moves_go_too():
    assert plain_text("see \x1b]8;;https://keras.io\x1b\\the docs\x1b]8;;\x1b\\\x1b[2K.") == (
        "see the docs."
    )


def test_every_domain_error_message_is_plain():
    error = InvalidRequest(KERAS_STYLE, field="fit")
    assert "\x1b" not in error.message
    assert "\x1b" not in str(error)
