"""A minimal Chrome DevTools Protocol driver for headless Debian chromium.

Why not playwright or selenium: both download their own browser or driver build,
which a machine with no internet cannot do; Debian's chromium speaks CDP itself,
and CDP is JSON over one WebSocket. This file is the whole driver: start the
browser, open a page, evaluate JavaScript, click like a mouse, wait with a time-out,
record every network request, take a screenshot.
"""

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import websocket  # websocket-client

from service import die_with_parent


class CdpError(RuntimeError):
    pass


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise CdpError("no chromium on PATH (Debian package 'chromium'; `make deps` installs it)")


class Browser:
    """One headless chromium with a fresh profile, driven over its browser WebSocket.

    Pages are attached in flat mode, so one socket carries every command, answer and
    event; events are kept in `self.events` for the checks to read.
    """

    def __init__(self, profile_dir, window=(1280, 2000), start_timeout=30.0):
        self.profile_dir = Path(profile_dir)
        self.window = window
        self.start_timeout = start_timeout
        self.proc = None
        self.ws = None
        self.next_id = 0
        self.events = []

    def __enter__(self):
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.profile_dir.parent / "chromium.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                chromium_binary(),
                "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions",
                # Containers (make test-docker) have a 64 MB /dev/shm: use /tmp instead.
                "--disable-dev-shm-usage",
                # Never a proxy, whatever the environment says: everything must stay on 127.0.0.1.
                "--no-proxy-server",
                f"--window-size={self.window[0]},{self.window[1]}",
                f"--user-data-dir={self.profile_dir}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log.close()
        try:
            self.ws = websocket.create_connection(
                self._devtools_url(), timeout=10, suppress_origin=True, http_no_proxy=["127.0.0.1"])
        except BaseException:
            self.close()
            raise
        return self

    def _devtools_url(self):
        """Chromium writes its chosen port and browser path to DevToolsActivePort."""
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited at start ({self.proc.returncode}): {self._log_tail()}")
            try:
                port, path = port_file.read_text().split()[:2]
                return f"ws://127.0.0.1:{port}{path}"
            except (OSError, ValueError):
                time.sleep(0.05)
        raise CdpError(f"chromium did not open its DevTools port in {self.start_timeout}s: {self._log_tail()}")

    def _log_tail(self):
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self):
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc):
        self.close()
        return False

    def send(self, method, params=None, session=None, timeout=15.0):
        """One command; returns its result, keeping the events that arrive meanwhile."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline, f"no answer to {method} within {timeout}s")
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _recv(self, deadline, what):
        left = deadline - time.monotonic()
        if left <= 0:
            raise CdpError(what)
        self.ws.settimeout(left)
        try:
            msg = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            raise CdpError(what) from None
        if "method" in msg:
            self.events.append(msg)
        return msg

    def pump(self, seconds):
        """Read events for a while (used to let late network events arrive)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self._recv(deadline, "")
        except CdpError:
            pass

    def new_page(self):
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)


class Page:
    """A tab: navigate, evaluate, wait for a condition, click, screenshot."""

    def __init__(self, browser, session):
        self.browser = browser
        self.session = session
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method, params=None, timeout=15.0):
        return self.browser.send(method, params, self.session, timeout)

    def goto(self, url, timeout=30.0):
        """Navigate and wait for the load event (scripts loaded; the app may still render)."""
        start = len(self.browser.events)
        result = self.send("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while not any(e["method"] == "Page.loadEventFired" and e.get("sessionId") == self.session
                      for e in self.browser.events[start:]):
            self.browser._recv(deadline, f"{url} did not fire its load event within {timeout}s")

    def eval(self, expression, timeout=15.0):
        """Evaluate JavaScript (promises awaited) and return its JSON value."""
        result = self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        }, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"JavaScript error: {text}\n  in: {expression[:200]}")
        return result["result"].get("value")

    def wait_for(self, expression, what, timeout=20.0, interval=0.1):
        """Poll a JavaScript expression until it is truthy; return its value or fail naming `what`."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            self.browser.pump(interval)
        raise CdpError(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")

    def click(self, selector_js, what):
        """Click an element like a person: scroll it into view, then a real mouse press/release
        at its centre (React handlers see a trusted event). `selector_js` is a JS expression
        giving the element."""
        box = self.eval(f"""(() => {{
            const el = {selector_js};
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2, w: r.width, h: r.height}};
        }})()""")
        if not box or not box["w"] or not box["h"]:
            raise CdpError(f"cannot click {what}: element missing or invisible ({box!r})")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {
                "type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1,
            })

    def type_into(self, element_js, text, what):
        """Replace a text field's content as a person would: focus it, select all, type.
        Input.insertText fires the real input events React listens to."""
        if not self.eval(f"""(() => {{ const el = {element_js};
                if (!el) return false; el.scrollIntoView({{block: 'center'}});
                el.focus(); el.select(); return true }})()"""):
            raise CdpError(f"cannot type into {what}: element missing")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path):
        """Save a PNG of the whole page (beyond the window too) and return its path."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, 30)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return path

    def requests(self):
        """Every URL this page requested so far (Network.requestWillBeSent)."""
        return [e["params"]["request"]["url"] for e in self.browser.events
                if e["method"] == "Network.requestWillBeSent" and e.get("sessionId") == self.session]

    def blocked_by_csp(self):
        """URLs the page's Content-Security-Policy stopped before any connection was made."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in self.browser.events
                if e["method"] == "Network.requestWillBeSent" and e.get("sessionId") == self.session}
        return {urls.get(e["params"]["requestId"], "?") for e in self.browser.events
                if e["method"] == "Network.loadingFailed" and e.get("sessionId") == self.session
                and e["params"].get("blockedReason") == "csp"}

    def failed_responses(self):
        """(url, status) of every HTTP response >= 400 and every load that failed outright."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in self.browser.events
                if e["method"] == "Network.requestWillBeSent" and e.get("sessionId") == self.session}
        bad = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            if e["method"] == "Network.responseReceived" and e["params"]["response"]["status"] >= 400:
                bad.append((e["params"]["response"]["url"], e["params"]["response"]["status"]))
            elif e["method"] == "Network.loadingFailed" and not e["params"].get("canceled"):
                bad.append((urls.get(e["params"]["requestId"], "?"), e["params"].get("errorText")))
        return bad
