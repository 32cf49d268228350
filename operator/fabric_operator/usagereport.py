"""`fabric-operator usage`: tokens per tenant and model over a period, asked of the
Prometheus that scrapes the gateways (its HTTP API, `/api/v1/query`), printed as a table
or JSON. The query is the README's ("Usage and limits")."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

_DURATION = re.compile(r"[1-9][0-9]*[smhdwy]")


def query(since: str, by: tuple[str, ...]) -> str:
    labels = ", ".join((*by, "kind"))
    return f"sum by ({labels}) (increase(fabric_gateway_tokens_total[{since}]))"


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prometheus", required=True, help="Prometheus base URL (http://host:9090)")
    p.add_argument(
        "--since", default="7d", type=_duration, help="the period, ending now (default 7d)"
    )
    p.add_argument(
        "--by",
        default="tenant,model",
        help="labels to group by: tenant, model, backend (default tenant,model)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the query")


def _duration(text: str) -> str:
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is no duration such as 30m, 24h or 7d")
    return text


def rows(result: list[dict[str, Any]], by: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per group: prompt, completion and total tokens (rounded: `increase`
    extrapolates, so Prometheus gives fractions)."""
    table: dict[tuple[str, ...], dict[str, Any]] = {}
    for sample in result:
        metric = sample.get("metric") or {}
        group = tuple(str(metric.get(label, "")) for label in by)
        row = table.setdefault(
            group, {**dict(zip(by, group, strict=True)), "prompt": 0, "completion": 0}
        )
        kind = metric.get("kind")
        if kind in ("prompt", "completion"):
            row[kind] += round(float(sample["value"][1]))
    out = sorted(table.values(), key=lambda r: [r[label] for label in by])
    for row in out:
        row["total"] = row["prompt"] + row["completion"]
    return out


def run(args: argparse.Namespace) -> int:
    by = tuple(label.strip() for label in args.by.split(",") if label.strip())
    bad = [label for label in by if label not in ("tenant", "model", "backend")]
    if not by or bad:
        print(f"--by: labels are tenant, model, backend (got {args.by!r})", file=sys.stderr)
        return 2
    import httpx  # noqa: PLC0415 - not imported by the operator's own commands

    url = args.prometheus.rstrip("/") + "/api/v1/query"
    try:
        resp = httpx.get(url, params={"query": query(args.since, by)}, timeout=args.timeout)
        resp.raise_for_status()
        body = resp.json()
    except (httpx.HTTPError, ValueError) as err:
        print(f"querying {url}: {err}", file=sys.stderr)
        return 1
    if body.get("status") != "success":
        print(f"Prometheus refused the query: {body.get('error')}", file=sys.stderr)
        return 1
    table = rows(body["data"]["result"], by)
    if args.json:
        for row in table:
            print(json.dumps(row))
        return 0
    heads = [*by, "prompt", "completion", "total"]
    cells = [[str(row[h]) for h in heads] for row in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(heads, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    print(f"tokens over the last {args.since}; {len(table)} rows")
    return 0
