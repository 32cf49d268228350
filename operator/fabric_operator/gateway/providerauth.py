"""Vertex AI's access tokens: short-lived OAuth 2.0 tokens minted from a Google
service-account key, for the backends that name one (`provider: vertex`).

Every other provider takes its key as it is, as the bearer (`routes.Backend.headers`);
Amazon Bedrock's API keys included. Vertex AI takes OAuth access tokens only. The
gateway signs a JWT assertion with the service account's private key (google-auth's RSA
signer and `jwt.encode`: the cryptography is the library's) and trades it at Google's
token endpoint for a token that lives an hour (Google Identity, "Using OAuth 2.0 for
Server to Server Applications"). The trade is a POST of the gateway's own upstream
client (`upstream.Client`): its connect timeout, no proxy taken from the environment,
nothing that blocks the event loop. A token is kept and used until REFRESH_EARLY before
it expires, then replaced in the background while it still serves; a request finds it
in memory, so no request waits for one but the first, or one after an outage.

The Secret is the tenant's, and so is everything in the key. What a hostile one could
try, and what stops it:

- A `token_uri` of its choosing (another team's Service, the cloud's metadata server),
  to make the gateway POST there and use the answer: the assertion goes to Google's
  token endpoint only, or to a host the platform admin allows for remote backends
  (`RemoteHosts`: how a test points it at a fake). Anything else: the key is refused.
- A key that is none (not JSON, another `type`, no or a broken `private_key`): the
  backend is not routed and says why, never quoting the key; other backends carry on.
- Another team's token: tokens are per backend and per key (its SHA-256), never shared.

Neither keys nor tokens are logged, or put in errors or metrics: the messages here are
written whole, from no part of the key or of the token endpoint's answer but its
status and OAuth error code.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from google.auth import crypt, jwt

from fabric_operator.gateway.upstream import (
    BrokenAnswerError,
    Client,
    Response,
    UpstreamBadResponseError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from fabric_operator.remotehosts import RemoteHosts

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
# Older keys name Google's older addresses of the same endpoint: sent to today's.
GOOGLE_TOKEN_URIS = frozenset(
    {
        GOOGLE_TOKEN_URI,
        "https://accounts.google.com/o/oauth2/token",
        "https://www.googleapis.com/oauth2/v4/token",
    }
)
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_SECONDS = 3600  # the longest an assertion may live (Google's limit)
REFRESH_EARLY = 300.0  # a token is replaced this long before it expires (at most half its life)
EXPIRY_MARGIN = 30.0  # ... and no longer sent this long before (at most a tenth of its life)
REFUSED_AFTER = 30.0  # a token this old that the provider refuses (401) is replaced at once
TOKEN_TIMEOUT = 10.0  # seconds for the whole token request
RETRY_AFTER = 5.0  # after a failed refresh, the next waits this long (no storm on an outage)
MAX_ANSWER = 64 * 1024
FORM = [
    (b"content-type", b"application/x-www-form-urlencoded"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"identity"),
]
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")  # what may follow "Bearer " in a header
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")  # an OAuth error code: invalid_grant, ...
_EMAIL = re.compile(r"[^@\s]{1,256}@[^@\s]{1,256}")


class CredentialError(ValueError):
    """A key that cannot be used; the message says why without quoting it."""


class UpstreamAuthError(Exception):
    """No access token now (the token endpoint refused, failed or did not answer): the
    request goes to the next backend, as for an upstream that is down."""


@dataclass(frozen=True)
class ServiceAccount:
    """What the gateway keeps of a service-account key: who it is, where its assertions
    go, and the signer holding its private key (never printed)."""

    email: str = field(repr=False)
    token_uri: str
    signer: Any = field(repr=False)  # google.auth.crypt.Signer (the library is untyped)

    def assertion(self, now: float) -> bytes:
        """A signed JWT asking for a cloud-platform token, valid for an hour from `now`."""
        issued = int(now)
        claims = {
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": issued,
            "exp": issued + ASSERTION_SECONDS,
        }
        signed: bytes = jwt.encode(self.signer, claims)  # type: ignore[no-untyped-call]
        return signed


def service_account(text: str, hosts: RemoteHosts) -> ServiceAccount:
    """Parse a service-account JSON key; CredentialError names what is wrong with it."""
    try:
        info = json.loads(text)
    except ValueError:
        raise CredentialError("is not JSON (a service-account key file is)") from None
    if not isinstance(info, dict):
        raise CredentialError("is not a JSON object (a service-account key file is)")
    if info.get("type") != "service_account":
        raise CredentialError("is not a service-account key (its 'type' is not service_account)")
    email = info.get("client_email")
    if not isinstance(email, str) or not _EMAIL.fullmatch(email):
        raise CredentialError("has no valid 'client_email'")
    if not isinstance(info.get("private_key"), str) or not info["private_key"]:
        raise CredentialError("has no 'private_key'")
    key_id = info.get("private_key_id")
    if key_id is not None and not isinstance(key_id, str):
        raise CredentialError("has a 'private_key_id' that is not a string")
    token_uri = token_endpoint(info.get("token_uri"), hosts)
    try:
        signer = crypt.RSASigner.from_service_account_info(info)  # type: ignore[no-untyped-call]
    except Exception:  # whatever the library raises, its message is not repeated
        raise CredentialError("has a 'private_key' that is not a PEM RSA private key") from None
    return ServiceAccount(email=email, token_uri=token_uri, signer=signer)


def token_endpoint(uri: object, hosts: RemoteHosts) -> str:
    """Where the assertion goes: Google's token endpoint, whatever older address of it
    the key names, or the key's `token_uri` if `hosts` allows it (an emulator, a test);
    never anywhere else."""
    if uri is None or uri in GOOGLE_TOKEN_URIS:
        return GOOGLE_TOKEN_URI
    if not isinstance(uri, str) or hosts.refusal(uri) is not None:
        raise CredentialError(
            f"names a 'token_uri' that is not {GOOGLE_TOKEN_URI} and whose host is not an "
            "allowed remote host: the gateway sends its assertion nowhere else"
        )
    return uri


class AccessTokens:
    """One backend's access token: minted on first use, replaced REFRESH_EARLY before it
    expires (in the background, while it still serves) or when the provider refuses it;
    one token request at a time, however many requests ask meanwhile. `clock` is wall
    time (the assertion's iat and exp are), injectable for tests."""

    def __init__(self, account: ServiceAccount, clock: Callable[[], float] = time.time) -> None:
        self.account, self.clock = account, clock
        self.minted = 0  # tokens obtained so far
        self._token: str | None = None
        self._obtained = 0.0
        self._renew_at = 0.0  # from then on, a new one is fetched in the background
        self._expires_at = 0.0  # from then on, this one is no longer sent
        self._refresh: asyncio.Task[str] | None = None
        self._failed: tuple[float, str] | None = None  # when, and why, the last one failed

    def __repr__(self) -> str:
        return f"AccessTokens(token_uri={self.account.token_uri!r}, minted={self.minted})"

    async def token(self, client: Client) -> str:
        """A token to send now: the one held, unless it is about to expire; raises
        UpstreamAuthError when none can be had."""
        now = self.clock()
        token = self._token
        if token is not None and now < self._expires_at:
            if now >= self._renew_at and not self._failing(now):
                self._start(client)  # the current one still serves meanwhile
            return token
        if self._refresh is None and self._failed is not None and self._failing(now):
            raise UpstreamAuthError(self._failed[1])
        # Shielded: a request whose client leaves does not cancel everyone's refresh.
        return await asyncio.shield(self._start(client))

    async def settled(self) -> None:
        """Wait for the token request under way, if any (tests; its outcome is kept)."""
        if self._refresh is not None:
            await asyncio.wait([self._refresh])

    def refused(self, token: str) -> bool:
        """The provider refused `token` (401): True if a new one is worth fetching (then
        the next `token` call does), False if it is the one just fetched (asking again at
        once would only fetch a token per request)."""
        if token != self._token:
            return True  # already replaced
        if self.clock() - self._obtained < REFUSED_AFTER:
            return False
        self._token = None
        return True

    def _failing(self, now: float) -> bool:
        return self._failed is not None and now - self._failed[0] < RETRY_AFTER

    def _start(self, client: Client) -> asyncio.Task[str]:
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._mint(client))
            self._refresh.add_done_callback(self._finished)
        return self._refresh

    def _finished(self, task: asyncio.Task[str]) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()  # retrieved here: a background refresh has no one awaiting it

    async def _mint(self, client: Client) -> str:
        began = self.clock()
        try:
            token, lifetime = await self._request(client, began)
        except UpstreamAuthError as err:
            self._failed = (self.clock(), str(err))
            raise
        early = min(REFRESH_EARLY, lifetime / 2)
        self._token, self._obtained, self._failed = token, began, None
        self._renew_at = began + lifetime - early
        self._expires_at = began + lifetime - min(EXPIRY_MARGIN, lifetime / 10)
        self.minted += 1
        return token

    async def _request(self, client: Client, now: float) -> tuple[str, float]:
        body = urlencode(
            {"grant_type": JWT_BEARER, "assertion": self.account.assertion(now).decode()}
        ).encode()
        try:
            async with asyncio.timeout(TOKEN_TIMEOUT):
                response = await client.post(self.account.token_uri, body, FORM, TOKEN_TIMEOUT)
                answer = await _read(response)
        except (TimeoutError, UpstreamTimeoutError):
            raise UpstreamAuthError(
                f"the token endpoint sent no answer within {TOKEN_TIMEOUT:g}s"
            ) from None
        except UpstreamUnreachableError as err:
            raise UpstreamAuthError(f"the token endpoint is unreachable ({err})") from None
        except (UpstreamBadResponseError, BrokenAnswerError):
            raise UpstreamAuthError(
                "the token endpoint answered something that is not HTTP"
            ) from None
        return _token_of(response.status, answer)


async def _read(response: Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.body():
            size += len(chunk)
            if size > MAX_ANSWER:
                raise UpstreamAuthError("the token endpoint's answer is too large")
            chunks.append(chunk)
    except BaseException:
        await response.abort()
        raise
    await response.close()
    return b"".join(chunks)


def _token_of(status: int, answer: bytes) -> tuple[str, float]:
    """(access token, seconds it lives) from the token endpoint's answer."""
    try:
        data = json.loads(answer)
    except ValueError:
        data = None
    if status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        code = f": {error}" if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""
        raise UpstreamAuthError(f"the token endpoint answered HTTP {status}{code}")
    if not isinstance(data, dict):
        raise UpstreamAuthError("the token endpoint's answer is not a JSON object")
    token, lifetime = data.get("access_token"), data.get("expires_in")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise UpstreamAuthError("the token endpoint's answer has no usable access_token")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
        raise UpstreamAuthError("the token endpoint's answer has no usable expires_in")
    if not 0 < lifetime <= 86400:
        raise UpstreamAuthError("the token endpoint's answer has no usable expires_in")
    return token, float(lifetime)


class Credentials:
    """Each Vertex backend's tokens, kept across snapshots while the backend keeps the
    same key: keyed by the backend and its key's SHA-256, so a rotated key starts anew
    and no two backends (nor namespaces) share a token. A key is parsed once; `sweep`
    drops what the last rebuild did not ask for."""

    def __init__(self, hosts: RemoteHosts | None = None, clock: Callable[[], float] = time.time):
        self.hosts = hosts if hosts is not None else RemoteHosts()
        self.clock = clock
        self._held: dict[tuple[str, bytes], AccessTokens | str] = {}  # or why it is unusable
        self._asked: set[tuple[str, bytes]] = set()

    def __len__(self) -> int:
        return len(self._held)

    def tokens(self, backend: str, key: str) -> AccessTokens:
        """The tokens of backend `backend` with this key; raises CredentialError."""
        ident = (backend, hashlib.sha256(key.encode()).digest())
        self._asked.add(ident)
        held = self._held.get(ident)
        if held is None:
            try:
                held = AccessTokens(service_account(key, self.hosts), self.clock)
            except CredentialError as err:
                held = str(err)
            self._held[ident] = held
        if isinstance(held, str):
            raise CredentialError(held)
        return held

    def sweep(self) -> None:
        """Forget what was not asked for since the last sweep (a backend deleted, its key
        rotated or no longer Vertex's)."""
        for ident in [i for i in self._held if i not in self._asked]:
            del self._held[ident]
        self._asked = set()
