"""kopf's listings, seen whole: an object a relisting no longer holds was deleted unseen.

kopf lists a resource, then watches from the listing's resourceVersion. When a watch
cannot go on (410 Gone once the version is compacted, an API server outage), it lists
again, and delivers what the new listing holds as events; it says nothing of objects
deleted meanwhile, for which no DELETED event will ever come. client-go's informers
replace their store with each listing for that reason. kopf gives its handlers no sign
that a listing is complete, so this wraps the one function kopf lists through and tells
its subscribers, once a listing has been read to its end, which objects it held: the
store can then forget the rest (a Deployment deleted while the watch was down would
otherwise be believed present, and never recreated).

Like `indexgate`, this wraps a private kopf function (kopf 1.45, `kopfcheck`); `install`
checks its shape first and refuses to start the operator if it has changed (relists would
lose their deletions again, unnoticed).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import NamedTuple

from kopf._cogs.clients import fetching
from kopf._cogs.configs import configuration
from kopf._cogs.helpers import typedefs
from kopf._cogs.structs import bodies, references

from fabric_operator.machinery.kopfcheck import KopfChangedError
from fabric_operator.machinery.store import resource_version

log = logging.getLogger(__name__)

_ORIGINAL = fetching.fetch_objs
_PARAMETERS = {"settings", "resource", "namespace", "logger"}


class Listing(NamedTuple):
    """A complete listing of one resource, in one namespace or (None) all of them."""

    group: str
    plural: str
    namespace: str | None
    names: frozenset[tuple[str, str]]  # (namespace, name) of every object it held
    version: int | None  # the listing's resourceVersion


Subscriber = Callable[[Listing], None]
_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> None:
    _subscribers.append(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    if subscriber in _subscribers:
        _subscribers.remove(subscriber)


async def fetch_objs(
    *,
    settings: configuration.OperatorSettings,
    resource: references.Resource,
    namespace: references.Namespace,
    logger: typedefs.Logger,
) -> AsyncIterator[tuple[Collection[bodies.RawBody], str]]:
    """kopf's listing, chunk by chunk as before; its subscribers are told once the last
    chunk has been read (a listing cut short by an error tells nobody)."""
    names: set[tuple[str, str]] = set()
    version: str | None = None
    async for chunk, version in _ORIGINAL(
        settings=settings, resource=resource, namespace=namespace, logger=logger
    ):
        for obj in chunk:
            meta = obj.get("metadata") or {}
            names.add((meta.get("namespace") or "", meta.get("name") or ""))
        yield chunk, version
    listing = Listing(
        resource.group,
        resource.plural,
        namespace,
        frozenset(names),
        resource_version(version),
    )
    for subscriber in list(_subscribers):
        try:
            subscriber(listing)
        except Exception:  # a subscriber's bug must not stop kopf's watch
            log.exception("relist subscriber failed on %s", listing[:3])


def _shape_known() -> bool:
    if not inspect.isasyncgenfunction(_ORIGINAL):
        return False
    params = inspect.signature(_ORIGINAL).parameters
    return set(params) == _PARAMETERS and all(p.kind is p.KEYWORD_ONLY for p in params.values())


def install() -> None:
    """Wrap kopf's listing (idempotent). Raises KopfChangedError, kopf untouched, if
    kopf's fetch_objs has changed."""
    if not _shape_known():
        raise KopfChangedError(
            "kopf._cogs.clients.fetching.fetch_objs (an async generator taking settings, "
            "resource, namespace, logger by keyword) has changed"
        )
    fetching.fetch_objs = fetch_objs
