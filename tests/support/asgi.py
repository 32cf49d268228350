"""One request through the gateway's ASGI app in process, without a server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def post(app: App, content: bytes, key: str, sent: list[dict[str, Any]]) -> None:
    """POST `content` to /v1/chat/completions with `key`; every message the app sends is
    appended to `sent` (also when the app raises). The client never disconnects."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-length", str(len(content)).encode()),
        ],
    }
    messages = [{"type": "http.request", "body": content, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
