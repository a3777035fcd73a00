"""Reading Prometheus metric names as PromQL uses them."""

from __future__ import annotations


def family_of(name: str, families: dict[str, str]) -> str | None:
    """The family a PromQL metric name belongs to, or None when the manager exposes no such series.

    Counters are exposed as <family>_total, histograms as <family>_bucket/_count/_sum (never bare),
    gauges as the family name."""
    if families.get(name) in ("gauge", "unknown"):
        return name
    for suffix, types in (("_total", ("counter",)), ("_bucket", ("histogram",)),
                          ("_count", ("histogram", "summary")), ("_sum", ("histogram", "summary"))):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and families.get(base) in types:
            return base
    return None
