"""A fake of the managed providers' endpoints on 127.0.0.1, checking what the gateway
sends: Amazon Bedrock's (`Authorization: Bearer <API key>`), Vertex AI's (a bearer access
token it issued and has not revoked) and Google's token endpoint (a JWT-bearer grant
whose assertion is signed by the test's service-account key, with the claims Google
requires). A decoy counts whatever reaches it: what must never be called."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support.upstream import chat_answer

EMAIL = "gateway@test-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
VERTEX_PATH = "/vertex/v1/projects/test-project/locations/us-central1/endpoints/openapi"
BEDROCK_PATH = "/bedrock/openai/v1"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_key(
    key: rsa.RSAPrivateKey, token_uri: str | None, **extra: Any
) -> dict[str, Any]:
    """A service-account JSON key as Google's console downloads it (fields it has)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        **extra,
    }
    if token_uri is not None:
        info["token_uri"] = token_uri
    return info


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class Fake:
    """The fake's state; its counters are what the tests read."""

    public_key: rsa.RSAPublicKey
    bedrock_key: str
    expires_in: int = 3600
    token_delay: float = 0.0  # seconds the token endpoint takes (concurrency tests)
    clock: Callable[[], float] = time.time  # Google's: the test's when it injects one
    base: str = ""  # http://127.0.0.1:PORT, once started
    token_requests: int = 0
    decoy_hits: int = 0
    problems: list[str] = field(default_factory=list)  # what the token endpoint refused
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (provider, authorization)

    @property
    def token_uri(self) -> str:
        return f"{self.base}/token"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post(BEDROCK_PATH + "/chat/completions", self._bedrock)
        app.router.add_post(VERTEX_PATH + "/chat/completions", self._vertex)
        app.router.add_route("*", "/decoy/{tail:.*}", self._decoy)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        why = self._check(form.get("grant_type"), form.get("assertion"))
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if why is not None:
            self.problems.append(why)
            return web.json_response(
                {"error": "invalid_grant", "error_description": why}, status=400
            )
        token = f"ya29.test-token-{len(self.issued) + 1}"
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    def _check(self, grant: object, assertion: object) -> str | None:
        """Why Google would refuse this grant (None: it would not)."""
        if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return f"grant_type {grant!r}"
        if not isinstance(assertion, str) or assertion.count(".") != 2:
            return "no JWT assertion"
        head, body, signature = assertion.split(".")
        try:
            self.public_key.verify(
                _b64(signature),
                f"{head}.{body}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:
            return "bad signature"
        header, claims = json.loads(_b64(head)), json.loads(_b64(body))
        if header.get("alg") != "RS256" or header.get("kid") != "0123456789abcdef":
            return f"header {header}"
        now = self.clock()
        if claims.get("iss") != EMAIL or claims.get("scope") != SCOPE:
            return f"iss/scope {claims}"
        if claims.get("aud") != self.token_uri:
            return f"aud {claims.get('aud')}"
        if claims["exp"] - claims["iat"] != 3600 or abs(claims["iat"] - now) > 300:
            return f"iat/exp {claims}"
        return None

    async def _bedrock(self, request: web.Request) -> web.Response:
        auth = request.headers.get("authorization", "")
        self.seen.append(("bedrock", auth))
        if auth != f"Bearer {self.bedrock_key}":
            return web.json_response({"message": "Invalid API key"}, status=401)
        body = await request.json()
        return web.json_response(chat_answer("bedrock", body["model"]))

    async def _vertex(self, request: web.Request) -> web.Response:
        auth = request.headers.get("authorization", "")
        self.seen.append(("vertex", auth))
        token = auth.removeprefix("Bearer ")
        if token not in self.issued or token in self.revoked:
            return web.json_response(
                {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401
            )
        body = await request.json()
        return web.json_response(chat_answer("vertex", body["model"]))

    async def _decoy(self, request: web.Request) -> web.Response:
        self.decoy_hits += 1
        return web.json_response({"access_token": "stolen", "expires_in": 3600})


@contextlib.asynccontextmanager
async def serving(fake: Fake) -> Any:
    """The fake on 127.0.0.1 in the running loop."""
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def in_thread(fake: Fake) -> Iterator[Fake]:
    """The fake on 127.0.0.1 in a thread of its own (for a gateway process)."""
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()

    async def main() -> None:
        async with serving(fake):
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), "the fake provider did not start"
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
