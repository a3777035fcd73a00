"""The proxy's per-request metrics are added up in plain ints and applied later (shared/metrics.py
Deferred): what the exposition shows once applied is what prometheus_client's own calls give."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from shared.metrics import PROXY_BUCKETS, Deferred


def _text(reg: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(reg).decode().splitlines() if "_created" not in line]


def _pair() -> tuple[CollectorRegistry, Histogram, Counter, CollectorRegistry, Histogram, Counter]:
    out: list = []
    for _ in range(2):
        reg = CollectorRegistry()
        out += [reg, Histogram("t_seconds", "t", ["route"], buckets=PROXY_BUCKETS, registry=reg),
                Counter("t_total", "t", ["route"], registry=reg)]
    return tuple(out)  # type: ignore[return-value]


async def test_deferred_observations_and_counts_render_as_direct_ones() -> None:
    reg_a, hist_a, count_a, reg_b, hist_b, count_b = _pair()
    deferred = Deferred(delay=3600)  # applied only by flush() here (render() flushes them all)
    # every bound itself (a value equal to a bound is in that bucket), between bounds, 0 and past the last
    amounts = [0.0, *PROXY_BUCKETS, *(b * 1.5 for b in PROXY_BUCKETS), 1e9, 0.0004, 0.0004]
    for x in amounts:
        hist_a.labels("/x").observe(x)
        count_a.labels("/x").inc()
        deferred.observe(hist_b.labels("/x"), x)
        deferred.inc(count_b.labels("/x"))
    assert _text(reg_a) != _text(reg_b)  # nothing applied before the flush
    deferred.flush()
    assert _text(reg_a) == _text(reg_b)
    deferred.observe(hist_b.labels("/x"), 0.2)
    hist_a.labels("/x").observe(0.2)
    deferred.flush()
    assert _text(reg_a) == _text(reg_b)


async def test_a_proxied_answers_three_counts_in_one_call_render_as_direct_ones() -> None:
    reg_a, hist_a, count_a, reg_b, hist_b, count_b = _pair()
    sent_a, sent_b = (Counter("t_bytes", "t", registry=r) for r in (reg_a, reg_b))
    deferred = Deferred(delay=3600)
    for x, n in ((0.0004, 25), (0.2, 0), (3.0, 100)):
        hist_a.labels("/x").observe(x)
        count_a.labels("/x").inc()
        sent_a.inc(n)
        deferred.answered(hist_b.labels("/x"), x, count_b.labels("/x"), sent_b, n)
    deferred.flush()
    assert _text(reg_a) == _text(reg_b)
