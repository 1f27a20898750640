"""Starts a private ticketd for one conformance check, and always stops it.

The checks must never touch a service the machine already runs, so each one gets
its own process: the debug binary `cargo test` built (or TICKETD_BIN), embedded
mode, a fresh SQLite file in a temp dir, a free port on 127.0.0.1, and an
organizer token so that the organizer's operations are exercised too.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "conformance-organizer-token-0123"

# Linux prctl(2) option: deliver a signal to the child when its parent dies.
_PR_SET_PDEATHSIG = 1


def die_with_parent():
    """preexec_fn for children: SIGKILL them if this runner dies, even by SIGKILL.

    try/finally covers exceptions and SIGTERM/SIGINT (see `stop_on_signals`); this
    covers the rest, so no stray ticketd or chromium outlives a killed `make`.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_on_signals():
    """Turn SIGTERM/SIGHUP into SystemExit so `finally` blocks (stop the children) run."""

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary():
    """The binary under test: TICKETD_BIN, else the debug build of this checkout."""
    path = Path(os.environ.get("TICKETD_BIN", ROOT / "target" / "debug" / "ticketd"))
    if not path.is_file():
        sys.exit(f"{path} does not exist: build it first (the Makefile does: cargo test --no-run)")
    return path


# No proxy, whatever the environment says: every request goes to our own 127.0.0.1 service.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url, timeout=5.0, headers=None, body=None):
    """GET (or, with a body, POST) JSON; any failure is a RuntimeError naming the request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={
        **({} if body is None else {"Content-Type": "application/json"}), **(headers or {})})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return json.load(r)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{req.get_method()} {url}: {e}") from None


class Service:
    """Context manager: a running ticketd on 127.0.0.1:<free port>, stopped on exit.

    `workdir` holds its database and its log (`ticketd.log`, shown when the start
    fails); the caller owns and removes it.
    """

    def __init__(self, workdir, extra_env=None, start_timeout=60.0):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "ticketd.log"
        self.extra_env = extra_env or {}
        self.start_timeout = start_timeout
        self.proc = None

    def __enter__(self):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATABASE_URL": f"sqlite://{self.workdir / 'ticket.db'}",
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "TICKET_KEY": "conformance-ticket-key-0123456789",
            # Tickets get issued during the run, so bookings change state under the fuzzer.
            "FINALIZE_DELAY_MS": "50",
            "RUST_LOG": "warn",
            **self.extra_env,
        }
        # extra_env names a variable with None to leave it unset (e.g. ADMIN_TOKEN: the open mode).
        env = {k: v for k, v in env.items() if v is not None}
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(binary())], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ticketd exited during start ({self.proc.returncode}):\n{self.log()}")
            try:
                get_json(self.base + "/health", timeout=1.0)
                return
            except RuntimeError:
                time.sleep(0.1)
        raise RuntimeError(f"ticketd did not answer /health within {self.start_timeout}s:\n{self.log()}")

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self):
        """SIGTERM (the graceful stop), then SIGKILL if it has not exited within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc):
        self.stop()
        return False
