"""What the proxy's header rules (manager/proxy/forwarding.py) cost per request: a table of microseconds.

    .venv/bin/python benchmarks/forwarding_cost.py
"""

from __future__ import annotations

import timeit

import msgspec

from manager.proxy.forwarding import HeaderRules
from shared.config import Config

cfg = msgspec.convert({"engine": {"docker": {"creation_kwargs": {"image": "x"}}}, "admin": {"token": "a" * 32},
                       "cluster": {"internal_token": "i" * 32}}, Config)
r = HeaderRules(cfg)
req = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"python-httpx/0.28"), (b"accept", b"*/*"),
       (b"accept-encoding", b"gzip"), (b"cookie", b"node_id=" + b"a" * 64), (b"content-type", b"application/json"),
       (b"content-length", b"80")]
resp = [(b"content-type", b"application/json"), (b"content-length", b"42"), (b"date", b"x"), (b"server", b"uvicorn")]
n = 200000
t_req = timeit.timeit(lambda: r.to_node(req), number=n) / n
t_resp = timeit.timeit(lambda: r.from_node(resp), number=n) / n
print("| step | per request |\n| --- | --- |")
print(f"| to_node (7 headers) | {t_req*1e6:.2f} us |\n| from_node (4 headers) | {t_resp*1e6:.2f} us |")
