"""The server-side command line: bad settings and the operator's token commands."""

from __future__ import annotations

import pytest

from service import main


def test_a_bad_setting_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FITSERVE_AUTH", "bogus")
    with pytest.raises(SystemExit) as exit_info:
        main.main(["serve", "--port", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fitserve serve: FITSERVE_AUTH__MODE: Input should be 'auto', 'tokens' or 'none'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "size"),
    [("2048", 2048), ("10G", 10 * 1024**3), ("512m", 512 * 1024**2), ("1.5KiB", 1536)],
)
def test_quota_sizes_read_like_people_write_them(text: str, size: int) -> None:
    assert main._size(text) == size
