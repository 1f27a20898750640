"""Issue 13, item 6: schemathesis runs every operation of /openapi.json against ticketd.

Starts a private ticketd (embedded mode, temp SQLite file, free port) and runs the
schemathesis CLI of the Makefile's virtualenv against its /openapi.json, with
schemathesis.toml beside this file, twice: with an organizer token set (the locked
mode, every example count of the config), then without one (the open mode of the old
service, whose description says so: fewer examples, the operations are the same code).
Fails if schemathesis finds anything, or if ticketd panicked, died or logged an error
meanwhile (hostile input is the client's mistake, never the server's). The service is
stopped on exit, whatever happens. Extra CLI arguments: SCHEMATHESIS_ARGS (e.g.
"--seed 7 -n 500").
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service import ADMIN_TOKEN, Service, stop_on_signals

HERE = Path(__file__).resolve().parent
# The run takes well under three minutes; twice that means something hangs: stop and fail.
HARD_LIMIT_S = 360


# The runs: (name, environment for ticketd, extra schemathesis arguments).
MODES = [
    ("organizer token set", {}, []),
    # /admin/* is shut to everyone in this mode (403, as described): nothing there to fuzz.
    ("open, as the old service (no ADMIN_TOKEN)", {"ADMIN_TOKEN": None},
     ["--max-examples", "25", "--exclude-path-regex", "^/admin/"]),
]


def main():
    stop_on_signals()
    started = time.monotonic()
    ok = all([run(name, env, args) for name, env, args in MODES])
    took = time.monotonic() - started
    print(f"schemathesis: {'ok' if ok else 'FAILED'} in {took:.1f}s")
    return 0 if ok else 1


def run(mode, service_env, extra_args):
    print(f"schemathesis, {mode}:", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ticketd-schemathesis-"))
    ok = False
    try:
        with Service(tmp, extra_env=service_env) as svc:
            cmd = [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file", str(HERE / "schemathesis.toml"),
                "run", svc.base + "/openapi.json", *extra_args,
                *shlex.split(os.environ.get("SCHEMATHESIS_ARGS", "")),
            ]
            # Our own 127.0.0.1 service: never through a proxy the environment may name.
            env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                   # schemathesis.toml hands it to the spec's "organizer" security scheme.
                   "TICKETD_ADMIN_TOKEN": ADMIN_TOKEN,
                   "TICKETD_SCHEMATHESIS_HOOKS": str(HERE / "schemathesis_hooks.py")}
            try:
                rc = subprocess.run(cmd, cwd=tmp, env=env, timeout=HARD_LIMIT_S).returncode
            except subprocess.TimeoutExpired:  # run() has killed it
                print(f"FAILED: schemathesis still running after {HARD_LIMIT_S}s (a hung request?)",
                      file=sys.stderr)
                rc = -1
            alive = svc.proc.poll() is None
            log = svc.log_path.read_text(errors="replace")
            panics = [line for line in log.splitlines() if "panicked" in line]
            # Promise 6: a client's mistake is not logged as a server error, however hostile.
            errors = [line for line in log.splitlines() if "ERROR" in line and "panicked" not in line]
            if not alive:
                print(f"FAILED: ticketd died during the run ({svc.proc.returncode}):\n{svc.log()}",
                      file=sys.stderr)
            if panics:
                print("FAILED: ticketd panicked:\n  " + "\n  ".join(panics[:20]), file=sys.stderr)
            if errors:
                print("FAILED: ticketd logged errors during the run:\n  " + "\n  ".join(errors[:20]),
                      file=sys.stderr)
            if rc != 0:
                print(f"FAILED: schemathesis exited {rc} (its report above)", file=sys.stderr)
            ok = rc == 0 and alive and not panics and not errors
    except RuntimeError as e:
        print(f"FAILED (setup): {e}", file=sys.stderr)
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        # Each failure above has its curl line: start `make run` and paste it (port 8000).
        print(f"  {mode}: FAILED; service log: {tmp / 'ticketd.log'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
