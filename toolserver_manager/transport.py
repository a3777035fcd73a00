"""The shared async core: one HTTP client, the session cookie, retries, errors mapped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import ssl
from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import IO, Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from toolserver_manager.errors import (
    ConnectionFailed,
    RequestTimeout,
    ToolServerError,
    detail_of,
    error_for,
    extra_of,
    retryable,
)

T = TypeVar("T")
Source = str | os.PathLike[str] | IO[bytes]
Dest = str | os.PathLike[str] | IO[bytes]
OnExit = Literal["release", "close", "keep"]
DEFAULT_URL = "http://127.0.0.1:8080"
CHUNK = 1 << 16


class _NoCookies(DefaultCookiePolicy):
    """Refuses every Set-Cookie: the session's node_id is sent explicitly and never replaced."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False


@functools.cache
def _default_tls(trust_env: bool, cafile: str, capath: str) -> ssl.SSLContext:
    return httpx.create_ssl_context(verify=True, trust_env=trust_env)


def tls_context(verify: Any, trust_env: bool) -> Any:
    """What a client's ``verify`` becomes: the default (True) is one context per process and CA
    setting, built once, since httpx builds one per client (25-55 ms of CPU loading the CA bundle
    for each session object); anything else (False, a context of the caller's) as given."""
    if verify is not True:
        return verify
    env = os.environ if trust_env else {}
    return _default_tls(trust_env, env.get("SSL_CERT_FILE", ""), env.get("SSL_CERT_DIR", ""))


class AsyncBase:
    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout = 600.0,
                 connect_timeout: float = 10.0, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 10.0, headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, verify: Any = True,
                 trust_env: bool = True) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.trust_env = trust_env
        tmo = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=connect_timeout)
        self._headers: dict[str, str] = dict(headers or {})
        self._http = httpx.AsyncClient(base_url=self.url, timeout=tmo, headers=self._headers,
                                       cookies=CookieJar(policy=_NoCookies()), transport=transport,
                                       verify=tls_context(verify, trust_env), trust_env=trust_env,
                                       follow_redirects=False)

    async def shutdown(self) -> None:
        """Close the HTTP connections (the node is left as it is)."""
        await self._http.aclose()

    def _delay(self, attempt: int) -> float:
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    async def _send(self, method: str, path: str, *, op: str = "", stream: bool = False,
                    build: Callable[[contextlib.ExitStack], dict[str, Any]] | None = None,
                    retry: bool = True, **kwargs: Any) -> httpx.Response:
        """Send with retries on 503 "node is not running/responding"; raise the typed error on >= 400.

        ``build`` makes fresh request arguments per attempt (a re-opened upload); with ``stream``
        the caller reads and closes the response.
        """
        attempt = 0
        while True:
            with contextlib.ExitStack() as stack:
                args = dict(kwargs)
                if build is not None:
                    args.update(build(stack))
                try:
                    req = self._http.build_request(method, path, **args)
                    resp = await self._http.send(req, stream=True)
                except httpx.TimeoutException as exc:
                    raise RequestTimeout(f"{method} {self.url}{path}: timed out ({type(exc).__name__})") from exc
                except httpx.TransportError as exc:
                    raise ConnectionFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc
                if resp.status_code >= 400:
                    try:
                        body = await resp.aread()
                    finally:
                        await resp.aclose()
                    err = error_for(resp.status_code, detail_of(body), op)
                    err.extra = extra_of(body)
                    if retry and attempt < self.retries and retryable(err):
                        await asyncio.sleep(self._delay(attempt))
                        attempt += 1
                        continue
                    raise err
                if not stream:
                    try:
                        await resp.aread()
                    finally:
                        await resp.aclose()
                return resp

    async def _json(self, method: str, path: str, *, op: str = "", **kwargs: Any) -> Any:
        resp = await self._send(method, path, op=op, **kwargs)
        try:
            return resp.json()
        except ValueError as exc:
            raise ToolServerError(f"{path}: not a JSON answer: {resp.text[:200]!r}", resp.status_code) from exc

    def _ws_url(self, path: str, query: dict[str, str]) -> str:
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode(query), ""))
