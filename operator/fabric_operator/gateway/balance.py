"""Which ready pod of a backend gets a request: pure code, no I/O.

Two strategies, chosen per backend (`spec.routing.strategy`):

- Least in flight (the default): the pod with the fewest requests this gateway has in
  flight to it; ties go round in turn, so equal pods share evenly. An engine's latency
  grows with its batch, so the emptiest pod answers first.
- Prefix affinity: consistent hashing with bounded loads (Mirrokni et al., as KubeAI's
  PrefixHash): a request's key (the start of its conversation: system prompt and first
  user message, up to `prefix_characters`) maps to a point on a ring of 256 virtual
  nodes per pod; the first pod clockwise whose load stays within 125 % of the mean
  takes it. So turns of one conversation reach the pod whose prompt cache holds their
  prefix, and a hot prefix spills over instead of piling onto one pod. The system
  prompt is in the key: with only the first user message ("hi"), unrelated
  conversations would collide.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

VIRTUAL_NODES = 256
LOAD_BOUND = 1.25


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=64)  # ~1 MiB a 64-pod ring; sets of pods change rarely
def ring(urls: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Sorted ring points and the pod each belongs to; a pod joining or leaving moves
    only the keys of its own points. Cached per set of pods (a snapshot's tuple)."""
    points = sorted(
        (_point(f"{url}#{i}".encode()), url) for url in urls for i in range(VIRTUAL_NODES)
    )
    return tuple(p for p, _ in points), tuple(u for _, u in points)


def least_in_flight(urls: Sequence[str], load: Callable[[str], int], turn: int) -> list[str]:
    """`urls` best first: fewest in flight, ties in turn from `turn` (a counter the
    caller advances per request), so an idle backend's pods still take turns."""
    n = len(urls)
    rotated = [urls[(turn + i) % n] for i in range(n)]
    return sorted(rotated, key=load)  # stable: equal loads keep the rotated order


def by_prefix(
    urls: tuple[str, ...], key: bytes, load: Callable[[str], int], bound: float = LOAD_BOUND
) -> tuple[list[str], bool]:
    """`urls` best first for a request keyed `key`, and whether the first is the key's
    own pod (False: it was over the bound and the request spilled to the next)."""
    if len(urls) == 1:
        return list(urls), True
    points, owners = ring(urls)
    loads = {u: load(u) for u in urls}
    cap = max(1, math.ceil((sum(loads.values()) + 1) / len(urls) * bound))
    start = bisect.bisect(points, _point(key)) % len(points)
    own = owners[start]
    if loads[own] + 1 <= cap:
        first = own
    else:  # clockwise to the first pod within the bound; each pod's points are many
        first = own
        for i in range(start + 1, start + len(points)):
            url = owners[i % len(points)]
            if loads[url] + 1 <= cap:
                first = url
                break
    rest = sorted((u for u in urls if u != first), key=loads.__getitem__)
    return [first, *rest], first == own


def prefix_key(payload: Mapping[str, Any], characters: int) -> bytes:
    """The start of a conversation, up to `characters`: the messages up to and including
    the first user message (the system prompt with it), each as role and text. Every
    later turn of the conversation starts the same way, so it keeps the key; two
    conversations with one opener but different system prompts do not share it. A
    completion's prompt is its own start. Images and other non-text parts add nothing."""
    parts: list[str] = []
    size = 0  # kept as it grows: a request of many tiny messages costs linear time
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            part = f"{message.get('role', '')}\x1f{_text(message.get('content'))}\x1e"
            parts.append(part)
            size += len(part)
            if message.get("role") == "user" or size >= characters:
                break
    else:
        prompt = payload.get("prompt")
        parts.append(prompt if isinstance(prompt, str) else _text(prompt))
    return "".join(parts)[:characters].encode("utf-8", "surrogatepass")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and "text" in p
        )
    return ""
