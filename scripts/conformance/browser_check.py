"""Issue 13, item 7: /docs and /redoc work in a real browser, with no internet.

Starts its own ticketd and a headless Debian chromium (fresh profile), then:
  1. /docs (Swagger UI) renders one operation block per operation of /openapi.json;
  2. GET /health, expanded, "Try it out", "Execute": the page shows 200 and the body
     the service returns; then a booking through "Try it out" of POST /book with a typed
     body (an event made beforehand), read back with its secret;
  3. /redoc (ReDoc) renders every operation too;
  4. every request either page made went to the service itself (127.0.0.1:<port>):
     the UI assets are compiled into the binary, as the service must work offline;
     no page request failed and no script threw.
Screenshots of each page (and of the failure, if any) are kept in the test's temp dir
and their paths printed. Every wait has a time-out.
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cdp import Browser, CdpError
from service import ADMIN_TOKEN, Service, get_json, stop_on_signals

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class CheckFailed(Exception):
    pass


def spec_operations(spec):
    """{(METHOD, path)} of every operation the spec describes."""
    return {(m.upper(), path) for path, item in spec.get("paths", {}).items()
            for m in item if m in HTTP_METHODS}


def check_same_origin(page, base, what):
    """Every request went to the service itself; nothing failed to load."""
    # A request the page's CSP refused never left the browser: not a leak, but worth a note
    # (what it was for is missing from the page).
    blocked = page.blocked_by_csp()
    for url in sorted(blocked):
        print(f"  note: {what} tried to load {url}; its Content-Security-Policy refused it")
    foreign = [u for u in page.requests()
               if not u.startswith(base + "/") and not u.startswith(("data:", "blob:", "about:"))
               and u not in blocked]
    if foreign:
        raise CheckFailed(f"{what} requested resources off the service (must work offline): {foreign}")
    # Browsers ask for /favicon.ico on their own; the service need not have one.
    failed = [(u, s) for u, s in page.failed_responses()
              if not u.endswith("/favicon.ico") and u not in blocked]
    if failed:
        raise CheckFailed(f"{what}: requests failed: {failed}")
    thrown = [e["params"]["exceptionDetails"] for e in page.browser.events
              if e["method"] == "Runtime.exceptionThrown" and e.get("sessionId") == page.session]
    if thrown:
        texts = [d.get("exception", {}).get("description") or d.get("text") for d in thrown]
        raise CheckFailed(f"{what}: uncaught JavaScript errors: {texts}")


def check_swagger_ui(page, base, ops, health):
    page.goto(base + "/docs")
    # Operations render once Swagger UI has fetched and parsed /openapi.json.
    page.wait_for("document.querySelectorAll('.opblock').length > 0",
                  "Swagger UI to render operation blocks (.opblock)", timeout=30)
    # Tags may start collapsed (docExpansion 'none'): open each one so that all operations render.
    page.eval("""document.querySelectorAll('.opblock-tag-section:not(.is-open) .opblock-tag')
                   .forEach(t => t.click())""")
    want = len(ops)
    page.wait_for(f"document.querySelectorAll('.opblock').length >= {want}",
                  f"{want} operation blocks", timeout=10)
    rendered = page.eval("""Array.from(document.querySelectorAll('.opblock')).map(b => [
        b.querySelector('.opblock-summary-method').textContent.trim().toUpperCase(),
        b.querySelector('.opblock-summary-path').getAttribute('data-path')])""")
    rendered = {tuple(r) for r in rendered}
    if rendered != ops:
        raise CheckFailed(f"Swagger UI operations differ from /openapi.json: "
                          f"missing {sorted(ops - rendered)}, extra {sorted(rendered - ops)}")
    errors = page.eval("""(() => { const e = document.querySelector('.swagger-ui .errors-wrapper');
                                   return e ? e.innerText : null })()""")
    if errors:
        raise CheckFailed(f"Swagger UI shows errors about the spec: {errors}")
    print(f"  /docs: {len(rendered)} operations rendered, as in /openapi.json")

    status, shown = try_it_out(page, "GET", "/health")
    if status != "200" or shown != health:
        raise CheckFailed(f"'Try it out' of GET /health shows {status} {shown!r}, "
                          f"the service answers 200 {health!r}")
    print(f"  /docs: GET /health 'Try it out' -> Execute shows {status} {json.dumps(shown)}")


def check_swagger_booking(page, base, event_id):
    """The README's walk, as a person does it in /docs: book a seat through 'Try it out' of
    POST /book, typing the body; the booking must then exist for its secret."""
    body = json.dumps({"user_id": 42, "event_id": event_id, "quantity": 1})
    status, shown = try_it_out(page, "POST", "/book", body=body)
    if status != "200" or not isinstance(shown, dict) or shown.get("status") != "PENDING" \
            or shown.get("event_id") != event_id or not shown.get("secret"):
        raise CheckFailed(f"'Try it out' of POST /book with {body} shows {status} {shown!r}, "
                          "not a 200 PENDING booking of that event with its secret")
    stored = get_json(f"{base}/book/{shown['id']}", headers={"X-Booking-Secret": shown["secret"]})
    if stored.get("id") != shown["id"] or stored.get("user_id") != 42:
        raise CheckFailed(f"the booking made in /docs reads back as {stored!r}")
    print(f"  /docs: POST /book 'Try it out' with a typed body -> Execute shows {status}, "
          f"booking {shown['id']} (read back with its secret)")


def try_it_out(page, method, path, body=None):
    """Expand an operation, 'Try it out', type the body if any, 'Execute'; return the
    (status, parsed JSON body) Swagger UI shows for the live response."""
    name = f"{method} {path}"
    summary = f"document.querySelector('.opblock-{method.lower()} .opblock-summary-path[data-path=\"{path}\"]')"
    if not page.eval(f"!!{summary}"):
        raise CheckFailed(f"Swagger UI has no {name} block")
    block = f"{summary}.closest('.opblock')"
    page.click(f"{block}.querySelector('.opblock-summary-path')", f"the {name} summary")
    page.wait_for(f"!!{block}.querySelector('.try-out__btn')", f"the 'Try it out' button of {name}")
    page.click(f"{block}.querySelector('.try-out__btn')", f"'Try it out' of {name}")
    page.wait_for(f"!!{block}.querySelector('button.execute')", f"the 'Execute' button of {name}")
    if body is not None:
        page.type_into(f"{block}.querySelector('textarea.body-param__text')", body, f"the body of {name}")
    page.click(f"{block}.querySelector('button.execute')", f"'Execute' of {name}")
    status = page.wait_for(
        f"""(() => {{ const c = {block}.querySelector('.live-responses-table .response .response-col_status');
                      return c ? c.textContent.trim() : null }})()""",
        f"the live response of {name}", timeout=15)
    text = page.eval(f"""(() => {{
        const h = Array.from({block}.querySelectorAll('.live-responses-table h5'))
                       .find(h => h.textContent.trim() === 'Response body');
        const p = h && h.parentElement.querySelector('pre');
        return p ? p.textContent : null }})()""")
    try:
        return status, json.loads(text or "")
    except ValueError:
        raise CheckFailed(f"'Try it out' of {name} shows {status} and a body that is not JSON: {text!r}") from None


def check_redoc(page, base, spec):
    page.goto(base + "/redoc")
    # ReDoc gives each operation's section a data-section-id "[tag/<tag>/]operation/<operationId>"
    # (an operation under two tags, or none, appears once per place): the set of operationIds.
    rendered = """Array.from(new Set(Array.from(document.querySelectorAll('[data-section-id*="operation/"]'))
                      .map(e => e.getAttribute('data-section-id').split('operation/').pop())))"""
    ids = [(op.get("operationId"), f"{m.upper()} {path}") for path, item in spec.get("paths", {}).items()
           for m, op in item.items() if m in HTTP_METHODS]
    # ReDoc (like client generators) names each operation by its operationId, which the
    # OpenAPI specification requires to be unique: two operations with one id share one anchor.
    seen = {}
    for op_id, name in ids:
        seen.setdefault(op_id, []).append(name)
    shared = {i: names for i, names in seen.items() if i is None or len(names) > 1}
    if shared:
        raise CheckFailed(f"operationIds must be unique (and present) in /openapi.json: {shared}")
    want = set(seen)
    try:
        page.wait_for(f"{rendered}.length >= {len(want)}", f"ReDoc to render {len(want)} operations",
                      timeout=30)
    except CdpError as e:
        text = page.eval("document.body ? document.body.innerText.slice(0, 500) : ''")
        raise CheckFailed(f"{e}; the page says: {text!r}") from None
    got = set(page.eval(rendered))
    if got != want:
        raise CheckFailed(f"ReDoc operations differ from /openapi.json: "
                          f"missing {sorted(map(str, want - got))}, extra {sorted(got - want)}")
    print(f"  /redoc: {len(got)} operations rendered, as in /openapi.json")


def main():
    stop_on_signals()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="ticketd-browser-"))
    (tmp / "service").mkdir()
    failed = False
    try:
        with Service(tmp / "service") as svc, Browser(tmp / "profile") as browser:
            spec = get_json(svc.base + "/openapi.json")
            ops = spec_operations(spec)
            health = get_json(svc.base + "/health")
            page = browser.new_page()
            step = "docs"
            try:
                check_swagger_ui(page, svc.base, ops, health)
                event = get_json(svc.base + "/event", body={"title": "Browser sale", "capacity": 5},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                check_swagger_booking(page, svc.base, event["id"])
                check_same_origin(page, svc.base, "/docs")
                print(f"  screenshot: {page.screenshot(tmp / 'docs.png')}")
                step = "redoc"
                page = browser.new_page()
                check_redoc(page, svc.base, spec)
                check_same_origin(page, svc.base, "/redoc")
                print(f"  screenshot: {page.screenshot(tmp / 'redoc.png')}")
            except (CheckFailed, CdpError) as e:
                failed = True
                print(f"FAILED ({step}): {e}", file=sys.stderr)
                try:
                    print(f"  screenshot of the failure: {page.screenshot(tmp / f'failure-{step}.png')}",
                          file=sys.stderr)
                except Exception as shot_error:  # the browser itself may be what failed
                    print(f"  (no screenshot: {shot_error})", file=sys.stderr)
    except (CdpError, RuntimeError, OSError) as e:  # the service, the browser, the spec
        failed = True
        print(f"FAILED (setup): {e}", file=sys.stderr)
    finally:
        # Keep the screenshots (and logs on failure); the profile and database are noise.
        shutil.rmtree(tmp / "profile", ignore_errors=True)
        if not failed:
            shutil.rmtree(tmp / "service", ignore_errors=True)
    took = time.monotonic() - started
    print(f"browser: {'FAILED' if failed else 'ok'} in {took:.1f}s (files in {tmp})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
