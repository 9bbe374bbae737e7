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


def test_shown_echoes_short_values_as_repr_and_cuts_long_ones_saying_their_length():
    from service.errors import ECHO_LIMIT, shown

    assert shown("abc") == "'abc'"
    assert shown(None) == "None"
    long = shown("x" * 10_000)
    assert long == repr("x" * ECHO_LIMIT) + "… (10000 characters)"
    assert shown({"k": "v" * 500}).endswith("… (509 characters)")
    assert len(shown(list(range(10_000)))) < ECHO_LIMIT + 30


def test_redacted_drops_traceback_lines_source_paths_and_hidden_folders():
    from service.errors import redacted

    message = (
        "ValueError: boom\n"
        "Traceback (most recent call last):\n"
        '  File "/opt/venv/lib/python3.11/site-packages/keras/src/ops.py", line 3, in f\n'
        "    raise ValueError(msg)\n"
        "    ^^^^^^^^^^^^^^^^^^^^^\n"
        "ValueError: no such file /srv/data/datasets/blobs/ab.npz (from /opt/app/service/x.py)"
    )

    assert redacted(message, {"/srv/data": "<data folder>"}) == (
        "ValueError: boom\n"
        "ValueError: no such file <data folder>/datasets/blobs/ab.npz (from <source>)"
    )
