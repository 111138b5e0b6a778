"""The Chromium driver's failures: a browser that won't start is named with its exit code and stderr."""

import os
import stat

import pytest

from pipeline.reports import browser


def test_a_browser_that_exits_at_once_is_an_error_with_its_exit_code_and_stderr(tmp_path, monkeypatch):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'Missing X server or $DISPLAY' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(browser, "executable", lambda: str(fake))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(
        browser.BrowserError,
        match=r"closed its pipe \(Chromium exit code 3\); its stderr ends: "
        r"Missing X server",
    ):
        browser.Chromium()
    assert set(os.listdir("/proc/self/fd")) == before  # the pipes closed


def test_a_browser_that_never_answers_is_stopped(tmp_path, monkeypatch):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(browser, "executable", lambda: str(fake))
    monkeypatch.setattr(browser, "TIMEOUT_SECONDS", 1)
    with pytest.raises(browser.BrowserError, match="did not answer within 1 s"):
        browser.Chromium()
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and "sleep 600" in command_line(pid)]


def command_line(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            return handle.read().replace("\0", " ")
    except OSError:  # the process ended meanwhile
        return ""


def test_no_browser_is_an_error_that_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(browser, "executable", lambda: None)
    with pytest.raises(browser.BrowserError, match="apt-get install chromium"):
        browser.Chromium()


def test_make_report_screenshot_draws_a_small_png_from_the_statistics_heading(tmp_path, capsys):
    """docs/validation-and-spans.md's `make report-screenshot ARGS=REPORT`: a PNG of the page from its Statistics
    heading down."""
    from PIL import Image

    from tests.conftest import skip_or_fail_in_ci

    if browser.executable() is None:
        skip_or_fail_in_ci("headless Chromium is not installed (make test installs Debian's chromium as root)")
    page = tmp_path / "run-1.html"
    page.write_text(
        "<!DOCTYPE html><html><body><h1>babyweight run 1</h1><div style='height:900px'></div>"
        "<h2>Statistics: the new span</h2><div style='width:300px;height:200px;background:#1f77b4'></div>"
        "</body></html>"
    )
    output = tmp_path / "docs" / "report.png"
    assert browser.main(["screenshot", "--output", str(output), "--height", "400", str(page)]) == 0
    assert capsys.readouterr().out.startswith(f"{output}: ")
    image = Image.open(output)
    assert image.size == (1100, 400) and output.stat().st_size < 30_000
    pixels = image.convert("RGB")
    assert pixels.getpixel((100, 100)) != (255, 255, 255)  # the blue block, 900 px down the page, is in the picture
    assert browser.main(["screenshot", "--output", str(output), str(tmp_path / "none.html")]) == 2
