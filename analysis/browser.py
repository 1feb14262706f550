"""Headless Chromium driven over the DevTools protocol, standard library only.

Chromium is started with `--remote-debugging-pipe`: it reads protocol commands from its file
descriptor 3 and writes replies and events to 4, each message JSON ended by a NUL byte (the
transport Playwright and Puppeteer use). No port, no websocket, no extra package: the
viewer's tests and its benchmark use this to load pages, type, click, read the DOM and take
screenshots. Chromium comes from the system (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
INSTALL_HINT = ("Chromium is needed for the viewer's browser checks: on Debian/Ubuntu "
                "`apt-get install -y chromium` (as root; `make test` does it when run as root), "
                "or set CHROMIUM=/path/to/chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"] if os.access(os.environ["CHROMIUM"], os.X_OK) else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Chromium:
    """One headless browser with a fresh profile; `page(url)` opens a tab."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("no Chromium found. " + INSTALL_HINT)
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self._log = open(os.path.join(self._profile, "stderr.log"), "wb")  # noqa: SIM115 - closed in close()
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def descriptors() -> None:  # in the child, before exec: the pipes become fds 3 and 4
            a, b = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        # close_fds=False keeps 3 and 4 (dup2 makes them inheritable); every other descriptor
        # Python made is non-inheritable already
        self.process = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            preexec_fn=descriptors, close_fds=False)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.version = self.send("Browser.getVersion")["product"]

    # ---- the protocol ----------------------------------------------------------------------
    def _messages(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no answer from Chromium in time")
            ready, _, _ = select.select([self._read], [], [], min(left, 1.0))
            if not ready:
                if self.process.poll() is not None:
                    raise BrowserError(f"Chromium exited ({self.process.returncode}); see {self._log.name}")
                continue
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed its pipe (exit {self.process.poll()}); see {self._log.name}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write, data):]
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._messages(deadline)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str | None, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method and event.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._messages(deadline))

    # ---- pages -----------------------------------------------------------------------------
    def page(self, url: str = "about:blank", width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        if url != "about:blank":
            page.goto(url)
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except (BrowserError, OSError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session, timeout)

    def goto(self, url: str, timeout: float | None = None) -> float:
        """Navigate and wait for the load event; the seconds it took."""
        started = time.monotonic()
        self.browser.events = [e for e in self.browser.events
                               if not (e.get("sessionId") == self.session and e["method"] == "Page.loadEventFired")]
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.browser.wait_event("Page.loadEventFired", self.session, timeout)
        return time.monotonic() - started

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JS expression (promises awaited), as JSON."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                 "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, interval: float = 0.05) -> Any:
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression!r}")
            time.sleep(interval)

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input, clear it, and type `text` as key events (input events fire)."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        if not text:
            self.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Backspace", "code": "Backspace",
                                                 "windowsVirtualKeyCode": 8})
            self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Backspace", "code": "Backspace",
                                                 "windowsVirtualKeyCode": 8})
        for char in text:
            self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": char, "key": char})
            self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": char})

    def errors(self) -> list[str]:
        """JS exceptions and console errors seen on this page so far."""
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif event["method"] == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}".strip())
        return found

    def drain(self) -> None:
        """Take in the events Chromium sent so far (a cheap command round trip)."""
        self.evaluate("0")

    def screenshot(self, path: str, full_page: bool = False) -> str:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        with open(path, "wb") as f:
            f.write(data)
        return path
