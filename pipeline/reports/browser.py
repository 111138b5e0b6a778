"""Pages opened in headless Chromium, offline: what loaded, what the console said, and screenshots.

The reports are meant to be looked at in a browser; this opens them in a real one (Debian's `chromium`)
over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no port, no client library), with every
request that leaves the machine refused, and reports the console's errors, the requests, the images and
headings the page shows. The tests check reports with it; `make report-screenshot` draws docs/report.png.

    python -m pipeline.reports.browser screenshot --output docs/report.png [REPORT]
"""

import argparse
import base64
import dataclasses
import fcntl
import io
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_SECONDS = 60
# What the page shows, gathered in the page once it has loaded and its images have decoded.
INSPECT = """(async () => {
  const images = [...document.images];
  await Promise.all(images.map(image => image.decode().catch(() => null)));
  return {
    images: images.map(image => ({alt: image.alt, loaded: image.complete && image.naturalWidth > 0,
                                  width: image.naturalWidth, height: image.naturalHeight})),
    headings: [...document.querySelectorAll('h1, h2, h3')].map(heading => heading.textContent.trim()),
    links: [...document.querySelectorAll('a[href]')].map(link => link.getAttribute('href')),
    title: document.title,
  };
})()"""


class BrowserError(RuntimeError):
    """Chromium is missing, didn't start, or didn't answer."""


@dataclasses.dataclass
class PageCheck:
    """What a page did when opened: console errors, requests other than file: and data:, images, headings."""

    errors: List[str]
    outside_requests: List[str]
    images: List[Dict[str, Any]]
    headings: List[str]
    links: List[str]
    title: str


def executable() -> Optional[str]:
    """The Chromium on this machine, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out, messages end in NUL)."""

    def __init__(self, width: int = 1200, height: int = 900):
        binary = executable()
        if binary is None:
            raise BrowserError(f"no Chromium found (looked for {', '.join(CANDIDATES)}); apt-get install chromium")
        self._profile = tempfile.mkdtemp(prefix="chromium-")
        self._stderr_path = pathlib.Path(self._profile) / "stderr.log"
        self._failed = False
        # Both pipes' child ends at 10 or above, so that moving them to 3 and 4 can't overwrite one another.
        pipes = [os.pipe(), os.pipe()]
        reading, writing = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (pipes[0][0], pipes[1][1]))
        for fd in (pipes[0][0], pipes[1][1]):
            os.close(fd)
        self._to_browser, self._from_browser = pipes[0][1], pipes[1][0]
        arguments = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            f"--window-size={width},{height}",
        ]
        if os.geteuid() == 0:
            arguments.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # bash moves the pipes to 3 and 4, where Chromium expects them, then becomes Chromium (no preexec_fn: this
        # process has threads); close_fds leaves the child nothing else of ours.
        moves = f'exec "$0" "$@" 3<&{reading} 4>&{writing} {reading}<&- {writing}>&-'
        try:
            with open(self._stderr_path, "wb") as stderr:
                self._process = subprocess.Popen(
                    ["bash", "-c", moves, *arguments],
                    pass_fds=(reading, writing),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
        except OSError as error:
            for fd in (self._to_browser, self._from_browser):
                os.close(fd)
            shutil.rmtree(self._profile, ignore_errors=True)
            raise BrowserError(f"can't start {binary} through bash: {error}") from None
        finally:
            os.close(reading)
            os.close(writing)
        self._buffer = b""
        self._next_id = 0
        self.events: List[Dict[str, Any]] = []
        self._session = ""
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network", "Inspector"):
                self.send(f"{domain}.enable")
            # Offline: anything but the page's own file and data URIs is refused (and shows as a console error).
            self.send("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
            self.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the browser (killed if it failed, or doesn't close within 10 s), its pipes and its profile."""
        try:
            if self._process.poll() is None and not self._failed:
                self.send("Browser.close", session=False)
                self._process.wait(timeout=10)
        except (BrowserError, OSError, ValueError, subprocess.TimeoutExpired):
            pass  # killed below: the polite way failed
        finally:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def _failure(self, what: str, ending: bool = False) -> BrowserError:
        """`what` went wrong, with how Chromium ended (`ending`: it is exiting, so wait a moment for its code) and
        the end of what it wrote to stderr; the browser is killed on close."""
        self._failed = True
        try:
            code = self._process.wait(timeout=5) if ending else self._process.poll()
        except subprocess.TimeoutExpired:
            code = None
        said = self._stderr_path.read_text(errors="replace")[-2000:].strip() if self._stderr_path.exists() else ""
        return BrowserError(
            f"{what} (Chromium {'still running' if code is None else f'exit code {code}'})"
            + (f"; its stderr ends: {said}" if said else "")
        )

    def _read_message(self, deadline: float) -> Dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not ready:
                raise self._failure(f"Chromium did not answer within {TIMEOUT_SECONDS} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise self._failure("Chromium closed its pipe", ending=True)
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: Optional[Dict[str, Any]] = None, session: bool = True) -> Dict[str, Any]:
        """Sends one command and returns its result; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session:
            message["sessionId"] = self._session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise self._failure(f"{method}: Chromium closed its pipe", ending=True) from None
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            answer = self._read_message(deadline)
            if answer.get("method") == "Inspector.targetCrashed":
                raise self._failure(f"{method}: the page crashed")
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, method: str) -> Dict[str, Any]:
        """The next event named `method` (or one that already came)."""
        deadline = time.monotonic() + TIMEOUT_SECONDS
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == "Inspector.targetCrashed":
                raise self._failure(f"waiting for {method}: the page crashed")
            if event.get("method") == method:
                return event

    def open(self, path: pathlib.Path) -> PageCheck:
        """Loads the page at `path` and returns what it did."""
        self.events.clear()
        self.send("Page.navigate", {"url": pathlib.Path(path).resolve().as_uri()})
        self.wait_for("Page.loadEventFired")
        shown = self.send("Runtime.evaluate", {"expression": INSPECT, "awaitPromise": True, "returnByValue": True})[
            "result"
        ]["value"]
        errors, requests = [], []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                errors.append(
                    params["exceptionDetails"].get("exception", {}).get("description")
                    or params["exceptionDetails"].get("text", "")
                )
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}".strip())
            elif event.get("method") == "Network.requestWillBeSent":
                requests.append(params["request"]["url"])
        outside = [url for url in requests if not url.startswith(("file:", "data:"))]
        return PageCheck(errors, outside, shown["images"], shown["headings"], shown["links"], shown["title"])

    def screenshot(self, top_heading: str = "", height: int = 0) -> bytes:
        """A PNG of the loaded page: from the heading that starts with `top_heading` (else the top), `height` px
        tall (else the viewport's height)."""
        expression = (
            "(() => { const found = [...document.querySelectorAll('h1, h2, h3')].find(h => "
            f"h.textContent.trim().startsWith({json.dumps(top_heading)})); const box = "
            "(found || document.body).getBoundingClientRect(); return [box.top + window.scrollY, "
            "document.documentElement.scrollWidth, window.innerHeight]; })()"
        )
        top, width, viewport = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})[
            "result"
        ]["value"]
        clip = {"x": 0, "y": max(top - 8, 0), "width": width, "height": height or viewport, "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        return base64.b64decode(data["data"])


def small_png(png: bytes, colours: int = 96) -> bytes:
    """The PNG with its colours reduced (a screenshot of plots and text loses nothing a reader sees)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def latest_report(reports: pathlib.Path) -> Optional[pathlib.Path]:
    """The newest run report in `reports` (by name: run names are start times), or None."""
    found = sorted(path for path in reports.glob("run-*.html") if not path.name.endswith("-facets.html"))
    return found[-1] if found else None


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m pipeline.reports.browser screenshot`: docs/report.png, the picture of a report."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.reports.browser", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("screenshot", help="a PNG of a report, from its plots of the statistics")
    shot.add_argument("report", nargs="?", type=pathlib.Path, help="default: the newest report under outputs/reports")
    shot.add_argument("--output", type=pathlib.Path, required=True)
    shot.add_argument("--from-heading", default="Statistics")
    shot.add_argument("--height", type=int, default=1000)
    shot.add_argument("--width", type=int, default=1100)
    args = parser.parse_args(argv)
    page = args.report
    if page is None:  # the reports' folder is the pipeline's: its import loads TensorFlow, quietly
        import babyweight_cli

        babyweight_cli.install_quiet_tensorflow()
        from pipeline import config as config_lib
        from pipeline.reports import report

        page = latest_report(report.reports_dir(config_lib.load_config()))
    if page is None or not page.is_file():
        print(f"error: no report at {page or 'outputs/reports'} (make run writes one)", file=sys.stderr)
        return 2
    try:
        with Chromium(args.width, args.height) as browser:
            check = browser.open(page)
            png = small_png(browser.screenshot(args.from_heading, args.height))
    except BrowserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if check.errors:
        print(f"error: {page} logged errors in Chromium: {check.errors}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(png)
    print(f"{args.output}: {len(png) // 1024} KiB, from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
