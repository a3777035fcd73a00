#!/usr/bin/env python3
"""Regenerate `properties.config` of the chart's values.schema.json from shared/config.py.

The chart's `config` block is the manager's Config struct key for key, so its schema is derived
from the struct (msgspec's JSON schema, inlined, unknown keys rejected like the struct does) plus
the few constraints below. Run it after adding or changing a config key, and add the key to
values.yaml with a `# --` comment; tests/test_helm.py fails until both are done.

    .venv/bin/python helm/update-config-schema.py          # rewrite the schema
    .venv/bin/python helm/update-config-schema.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCHEMA = ROOT / "helm" / "toolserver-manager" / "values.schema.json"

from shared.config import IMAGE_PULL_POLICIES, PLACEMENTS, RENAMED, Config  # noqa: E402  (needs ROOT on sys.path first)

# constraints msgspec cannot know: (path, extra schema)
CONSTRAINTS: list[tuple[str, dict[str, Any]]] = [
    ("port", {"minimum": 1, "maximum": 65535}),
    ("workers", {"minimum": 1}),
    ("engine.docker.threads", {"minimum": 1}),
    # the chart runs product engines only: the unit tests' fake engine is left out below
    ("engine.kind", {"enum": ["docker"]}),
    ("log_format", {"enum": ["logfmt", "json"]}),
    ("manager_id", {"pattern": "^[^:]*$", "description": "empty: the chart's full name; no ':'"}),
    ("node.port", {"minimum": 1, "maximum": 65535}),
    ("admin.console_port", {"minimum": 1, "maximum": 65535}),
    ("node.creation_wait_seconds", {"exclusiveMinimum": 0}),
    ("creation.lease_seconds", {"minimum": 1}),
    ("pool.refill_quiet_seconds", {"minimum": 0}),
    ("pool.refill_defer_seconds", {"minimum": 0}),
    ("node.image_pull", {"enum": list(IMAGE_PULL_POLICIES)}),
    ("cluster.placement", {"enum": list(PLACEMENTS)}),
    ("checker.lease_ttl_seconds", {"exclusiveMinimum": 0}),
    ("checker.interval_seconds", {"exclusiveMinimum": 0}),
    ("redis.sentinels.items", {"pattern": "^.+:[0-9]+$"}),
    ("redis.cluster_nodes.items", {"pattern": "^.+:[0-9]+$"}),
    # XAgent's keys, accepted so its manager.yml loads: nothing reads them
    ("logger", {"description": "XAgent's logger name: accepted, never read (log records are named by module)"}),
    ("node.health_check", {"description": "XAgent's: accepted, never read (readiness is always the manager's own "
                                          "probe of node.health_path)"}),
    ("node.health_check_interval", {"description": "XAgent's: accepted, never read (the checker's pass interval "
                                                   "is checker.interval_seconds)"}),
    # secrets stay out of the ConfigMap: the chart mounts the Secret and sets the *_file keys
    ("admin.token", {"maxLength": 0, "description": "set by the chart from secrets.*: leave empty"}),
    ("admin.token_file", {"maxLength": 0, "description": "set by the chart: leave empty"}),
    ("cluster.internal_token", {"maxLength": 0, "description": "set by the chart from secrets.*: leave empty"}),
    ("cluster.internal_token_file", {"maxLength": 0, "description": "set by the chart: leave empty"}),
    ("cluster.node_secret_key", {"maxLength": 0, "description": "set by the chart from secrets.*: leave empty"}),
    ("cluster.node_secret_key_file", {"maxLength": 0, "description": "set by the chart: leave empty"}),
    ("redis.password_file", {"maxLength": 0, "description": "set by the chart from secrets.*: leave empty"}),
]


# config sections the chart leaves out: not product settings
OMITTED = [("engine", "fake")]


def config_schema() -> dict[str, Any]:
    raw = msgspec.json.schema(Config)
    defs = raw["$defs"]

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(x) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return inline(defs[node["$ref"].split("/")[-1]])
        out = {k: inline(v) for k, v in node.items() if k not in ("default", "title", "description", "required")}
        if "properties" in node:  # a config key may be named like a dropped keyword (egress.default)
            out["properties"] = {k: inline(v) for k, v in node["properties"].items()}
        # anyOf of bare types -> a type list: shorter error messages from helm
        if "anyOf" in out and all(set(x) == {"type"} for x in out["anyOf"]):
            out["type"] = [x["type"] for x in out.pop("anyOf")]
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
        return out

    schema = inline(raw)
    for path, extra in CONSTRAINTS:
        node = schema
        for part in path.split("."):
            node = node["items"] if part == "items" else node["properties"][part]
        node.update(extra)
    for *parents, key in OMITTED:
        node = schema
        for part in parents:
            node = node["properties"][part]
        del node["properties"][key]
    # a key that moved is still read (shared/config.py RENAMED): an older values file keeps working
    for old, new in RENAMED.items():
        node = schema
        for part in new:
            node = node["properties"][part]
        moved = {**node, "deprecated": True, "description": f"read as {'.'.join(new)}"}
        parent = schema
        for part in old[:-1]:
            parent = parent["properties"][part]
        parent["properties"][old[-1]] = moved
    schema["description"] = "The manager's configuration (shared/config.py), key for key; rendered as manager.yml."
    return schema


def main() -> int:
    values_schema = json.loads(SCHEMA.read_text())
    fresh = config_schema()
    if "--check" in sys.argv[1:]:
        if values_schema["properties"]["config"] != fresh:
            print(f"{SCHEMA.relative_to(ROOT)}: properties.config is out of date with shared/config.py; "
                  f"run: .venv/bin/python {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    values_schema["properties"]["config"] = fresh
    SCHEMA.write_text(json.dumps(values_schema, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
