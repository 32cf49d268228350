"""Amazon Bedrock and Vertex AI behind the gateway, against a fake of their endpoints on
127.0.0.1 (tests/support/providers.py) that checks what each takes: Bedrock's API key as
the bearer; Vertex AI's access tokens, minted from a service-account key through a JWT
assertion the fake token endpoint verifies with the test's own RSA key. Token lifetimes
run on an injected clock, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from fabric_operator.gateway.metrics import GatewayMetrics
from fabric_operator.gateway.providerauth import (
    GOOGLE_TOKEN_URI,
    AccessTokens,
    CredentialError,
    Credentials,
    ServiceAccount,
    UpstreamAuthError,
    service_account,
)
from fabric_operator.gateway.proxy import Gateway
from fabric_operator.gateway.routes import Backend, Tenant, build_snapshot, key_digest
from fabric_operator.gateway.sources import FileSource, KubeSource, Source, authorize
from fabric_operator.gateway.upstream import AiohttpClient, Timeouts
from fabric_operator.remotehosts import RemoteHosts
from tests.support import asgi
from tests.support.gateway import gateway
from tests.support.providers import (
    BEDROCK_PATH,
    VERTEX_PATH,
    Fake,
    in_thread,
    rsa_key,
    service_account_key,
    serving,
)
from tests.support.upstream import Process

BEDROCK_KEY = "ABSKQmVkcm9ja0FQSUtleS1test-bedrock-key"
TENANT_KEY = "sk-team-4d2f"
LOCAL = RemoteHosts((), ("127.0.0.1",))  # the fake's host, as an admin would allow it
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class Clock:
    def __init__(self) -> None:
        import time  # noqa: PLC0415 - the real time, once: the assertion's iat must be near it

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa_key()


@contextlib.asynccontextmanager
async def upstream_client() -> AsyncIterator[AiohttpClient]:
    client = AiohttpClient(Timeouts())
    try:
        yield client
    finally:
        await client.close()


def fake_for(key: rsa.RSAPrivateKey, **kw: Any) -> Fake:
    return Fake(public_key=key.public_key(), bedrock_key=BEDROCK_KEY, **kw)


def tokens_for(fake: Fake, key: rsa.RSAPrivateKey, clock: Clock) -> AccessTokens:
    info = service_account_key(key, fake.token_uri)
    return AccessTokens(service_account(json.dumps(info), LOCAL), clock)


# ---- the token's life ----------------------------------------------------------------------


def test_a_vertex_token_is_minted_from_a_signed_assertion_and_renewed_before_it_expires(
    key: rsa.RSAPrivateKey,
) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with (
            upstream_client() as client,
            serving(fake_for(key, clock=clock, expires_in=3600)) as fake,
        ):
            tokens = tokens_for(fake, key, clock)
            first = await tokens.token(client)
            assert first == fake.issued[0] and fake.token_requests == 1
            assert fake.problems == []  # signature, iss, scope, aud, iat/exp as Google checks
            clock.now += 3000  # within the hour, more than 5 min before its end: kept
            assert await tokens.token(client) == first and fake.token_requests == 1
            clock.now += 301  # 5 min before the end: still sent, a new one is fetched
            assert await tokens.token(client) == first
            await tokens.settled()
            assert fake.token_requests == 2 and fake.problems == []
            assert await tokens.token(client) == fake.issued[1] != first
            clock.now += 3600  # nothing asked for an hour: the held one is over, wait
            assert await tokens.token(client) == fake.issued[2] and fake.token_requests == 3
            print("tokens:", fake.issued, "minted:", tokens.minted)

    asyncio.run(scenario())


def test_a_short_lived_token_is_renewed_at_half_its_life(key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with (
            upstream_client() as client,
            serving(fake_for(key, clock=clock, expires_in=60)) as fake,
        ):
            tokens = tokens_for(fake, key, clock)
            first = await tokens.token(client)
            clock.now += 29
            assert await tokens.token(client) == first and fake.token_requests == 1
            clock.now += 2  # 31 s of 60: renewed in the background
            assert await tokens.token(client) == first
            await tokens.settled()
            assert fake.token_requests == 2
            clock.now += 60  # both gone: a request waits for the third
            assert await tokens.token(client) == fake.issued[2]

    asyncio.run(scenario())


def test_concurrent_requests_share_one_token_request(key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with (
            upstream_client() as client,
            serving(fake_for(key, clock=clock, token_delay=0.2)) as fake,
        ):
            tokens = tokens_for(fake, key, clock)
            got = await asyncio.gather(*(tokens.token(client) for _ in range(50)))
            assert set(got) == {fake.issued[0]} and fake.token_requests == 1
            clock.now += 3400  # renewal time: 50 more requests start one refresh
            got = await asyncio.gather(*(tokens.token(client) for _ in range(50)))
            assert set(got) == {fake.issued[0]}
            await tokens.settled()
            assert fake.token_requests == 2

    asyncio.run(scenario())


def test_a_failing_token_endpoint_is_not_stormed_and_its_error_quotes_nothing(
    key: rsa.RSAPrivateKey,
) -> None:
    other = rsa_key()  # the fake verifies with `other`: every signature is wrong

    async def scenario() -> None:
        clock = Clock()
        async with (
            upstream_client() as client,
            serving(fake_for(other, clock=clock)) as fake,
        ):
            tokens = tokens_for(fake, key, clock)
            for _ in range(5):
                with pytest.raises(UpstreamAuthError) as err:
                    await tokens.token(client)
                assert str(err.value) == "the token endpoint answered HTTP 400: invalid_grant"
            assert fake.token_requests == 1  # then nothing for RETRY_AFTER
            clock.now += 6
            with pytest.raises(UpstreamAuthError):
                await tokens.token(client)
            assert fake.token_requests == 2

    asyncio.run(scenario())


# ---- keys the gateway refuses ----------------------------------------------------------------


def test_a_token_uri_the_admin_does_not_allow_is_never_called(key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with (
            upstream_client() as client,
            serving(fake_for(key)) as decoy,
            serving(fake_for(key, clock=clock)) as fake,
        ):
            credentials = Credentials(LOCAL, clock)  # 127.0.0.1 allowed, localhost not
            hostile = service_account_key(key, decoy.base.replace("127.0.0.1", "localhost"))
            hostile["token_uri"] += "/decoy/token"
            metadata = service_account_key(
                key, "http://metadata.google.internal/computeMetadata/v1/token"
            )
            for info in (hostile, metadata):
                backend = Backend(id="ns/v", model="v", urls=("http://x/v1",), provider="vertex")
                problem = authorize(backend, json.dumps(info), credentials)
                assert problem is not None and "token_uri" in problem, problem
                assert backend.urls == () and backend.auth is None
                assert "localhost" not in problem and "metadata" not in problem
            assert decoy.decoy_hits == 0 and decoy.token_requests == 0
            # The legitimate path: a host the admin allows, and Google's own.
            good = Backend(id="ns/g", model="g", urls=("http://x/v1",), provider="vertex")
            assert (
                authorize(good, json.dumps(service_account_key(key, fake.token_uri)), credentials)
                is None
            )
            assert good.auth is not None and await good.auth.token(client) == fake.issued[0]
            default = service_account(json.dumps(service_account_key(key, None)), RemoteHosts())
            assert default.token_uri == GOOGLE_TOKEN_URI
            assert decoy.decoy_hits == 0

    asyncio.run(scenario())


def test_tokens_are_per_backend_and_per_key(key: rsa.RSAPrivateKey) -> None:
    credentials = Credentials(LOCAL)
    text = json.dumps(service_account_key(key, "http://127.0.0.1:1/token"))
    a, b = credentials.tokens("team-a/v", text), credentials.tokens("team-b/v", text)
    assert a is not b and credentials.tokens("team-a/v", text) is a
    rotated = json.dumps(service_account_key(rsa_key(), "http://127.0.0.1:1/token"))
    assert credentials.tokens("team-a/v", rotated) is not a
    credentials.sweep()
    credentials.tokens("team-a/v", rotated)
    credentials.sweep()  # only what the last rebuild asked for is kept
    assert len(credentials) == 1


# ---- through the gateway's request path ------------------------------------------------------


def test_a_revoked_token_is_replaced_once_on_a_401(key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with serving(fake_for(key, clock=clock)) as fake:
            tokens = tokens_for(fake, key, clock)
            backend = Backend(
                id="ns/vertex",
                model="gemini",
                urls=(fake.base + VERTEX_PATH,),
                provider="vertex",
                remote=True,
                upstream_model="google/gemini-2.0-flash-001",
                auth=tokens,
            )
            source = Source()
            tenant = Tenant(name="ns/key", models=("*",), namespaces=("*",))
            source.snapshot = build_snapshot([backend], {key_digest(TENANT_KEY): tenant})
            registry = CollectorRegistry()
            gw = Gateway(source, GatewayMetrics(registry))
            assert (await ask(gw))[0] == 200 and fake.seen[-1][1] == f"Bearer {fake.issued[0]}"
            fake.revoked.add(fake.issued[0])  # revoked at Google: answered 401
            clock.now += 60
            status, body = await ask(gw)
            assert status == 200 and body["model"] == "google/gemini-2.0-flash-001"
            assert [a for _, a in fake.seen[-2:]] == [f"Bearer {t}" for t in fake.issued[:2]]
            fake.revoked.add(fake.issued[1])  # refused again at once: passed on, no storm
            status, _ = await ask(gw)
            assert status == 401 and fake.token_requests == 2
            await gw.aclose()

    asyncio.run(scenario())


async def ask(gw: Gateway) -> tuple[int, dict[str, Any]]:
    content = json.dumps({"model": "gemini", **CHAT}).encode()
    sent: list[dict[str, Any]] = []
    await asgi.post(gw, content, TENANT_KEY, sent)  # type: ignore[arg-type]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], json.loads(body)


# ---- the gateway process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def providers(key: rsa.RSAPrivateKey) -> Iterator[tuple[Fake, Fake]]:
    with in_thread(fake_for(key)) as fake, in_thread(fake_for(key)) as decoy:
        yield fake, decoy


@pytest.fixture(scope="module")
def gw(
    providers: tuple[Fake, Fake], key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    fake, decoy = providers
    hostile = service_account_key(key, decoy.base.replace("127.0.0.1", "localhost") + "/decoy/t")
    env = {
        "TENANT": TENANT_KEY,
        "BEDROCK": BEDROCK_KEY,
        "VERTEX": json.dumps(service_account_key(key, fake.token_uri)),
        "HOSTILE": json.dumps(hostile),
        "BROKEN": "not-json " + BEDROCK_KEY,
    }
    vertex_url = fake.base + VERTEX_PATH
    config = {
        "backends": [
            {
                "id": "ns/bedrock",
                "model": "gpt-oss",
                "baseURLs": [fake.base + BEDROCK_PATH],
                "apiKeyEnv": "BEDROCK",
                "provider": "bedrock",
                "upstreamModel": "openai.gpt-oss-120b-1:0",
            },
            {
                "id": "ns/vertex",
                "model": "gemini",
                "baseURLs": [vertex_url],
                "apiKeyEnv": "VERTEX",
                "provider": "vertex",
                "upstreamModel": "google/gemini-2.0-flash-001",
            },
            {
                "id": "ns/hostile",
                "model": "hostile",
                "baseURLs": [vertex_url],
                "apiKeyEnv": "HOSTILE",
                "provider": "vertex",
            },
            {
                "id": "ns/broken",
                "model": "broken",
                "baseURLs": [vertex_url],
                "apiKeyEnv": "BROKEN",
                "provider": "vertex",
                "fallback": ["ns/bedrock"],
            },
        ],
        "tenants": [{"name": "team", "keyEnv": "TENANT", "models": ["*"]}],
    }
    workdir = tmp_path_factory.mktemp("providers")
    with gateway("--remote-http-hosts=127.0.0.1", config=config, env=env, workdir=workdir) as g:
        g.workdir = workdir  # type: ignore[attr-defined]
        yield g


def post(gw: Process, model: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, **CHAT},
        headers={"authorization": f"Bearer {TENANT_KEY}"},
        timeout=10,
    )


def test_bedrock_gets_its_api_key_as_the_bearer(gw: Process, providers: tuple[Fake, Fake]) -> None:
    fake, _ = providers
    resp = post(gw, "gpt-oss")
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "openai.gpt-oss-120b-1:0"
    assert fake.seen[-1] == ("bedrock", f"Bearer {BEDROCK_KEY}")


def test_vertex_gets_a_minted_token_once_for_many_requests(
    gw: Process, providers: tuple[Fake, Fake]
) -> None:
    fake, _ = providers
    for _ in range(3):
        resp = post(gw, "gemini")
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "google/gemini-2.0-flash-001"
    vertex = [a for p, a in fake.seen if p == "vertex"]
    assert vertex[-3:] == [f"Bearer {fake.issued[0]}"] * 3
    assert fake.token_requests == 1 and fake.problems == []


def test_hostile_and_broken_keys_are_refused_by_name_and_others_keep_working(
    gw: Process, providers: tuple[Fake, Fake]
) -> None:
    _, decoy = providers
    hostile = post(gw, "hostile")
    assert hostile.status_code == 503
    message = hostile.json()["error"]["message"]
    assert "token_uri" in message and "localhost" not in message, message
    assert decoy.decoy_hits == 0 and decoy.token_requests == 0
    broken = post(gw, "broken")  # unusable: its fallback answers
    assert broken.status_code == 200 and broken.headers["x-fabric-backend"] == "ns/bedrock"
    assert post(gw, "gemini").status_code == 200
    print("hostile:", message)


def test_no_key_nor_token_reaches_the_log(gw: Process, providers: tuple[Fake, Fake]) -> None:
    fake, _ = providers
    post(gw, "gemini")
    post(gw, "broken")
    log = (Path(gw.workdir) / "gateway.log").read_text()  # type: ignore[attr-defined]
    assert "is not JSON" in log  # the broken key is named, not quoted
    secrets = [BEDROCK_KEY, "PRIVATE KEY", "not-json", *fake.issued]
    assert not [s for s in secrets if s in log]


def test_malformed_keys_are_refused_without_quoting_them(caplog: pytest.LogCaptureFixture) -> None:
    marker = "SECRET-MATERIAL-9f2c"
    pem = f"-----BEGIN PRIVATE KEY-----\n{marker}\n-----END PRIVATE KEY-----\n"
    key = rsa_key()
    good = service_account_key(key, None)
    cases = {
        f"not json {marker}": "is not JSON",
        json.dumps([marker]): "is not a JSON object",
        json.dumps({**good, "type": f"authorized_user-{marker}"}): "is not a service-account key",
        json.dumps({k: v for k, v in good.items() if k != "private_key"}): "no 'private_key'",
        json.dumps({**good, "private_key": pem}): "not a PEM RSA private key",
        json.dumps({**good, "client_email": marker}): "no valid 'client_email'",
    }
    credentials = Credentials()
    with caplog.at_level(logging.DEBUG):
        for text, why in cases.items():
            with pytest.raises(CredentialError) as err:
                credentials.tokens("ns/v", text)
            assert why in str(err.value) and marker not in str(err.value)
            # Nothing chained: no library message (which might quote the key) rides along.
            assert err.value.__cause__ is None and err.value.__context__ is None
    assert marker not in caplog.text


# ---- a hostile key: no crash, no blocked loop, no frozen routing -----------------------------

MARKER = "SECRET-MATERIAL-51b7"
VERTEX_URL = (
    "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/"
    "endpoints/openapi"
)


@pytest.fixture(scope="module")
def big_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=8192)  # ~2 s, once


class Loads:
    """A spy on cryptography's PEM loader (google-auth's path calls it too): how often a
    key is parsed, and whether any call asked for the full RSA key validation (seconds
    for a large key, on the event loop)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        self.calls: list[bool] = []  # unsafe_skip_rsa_key_validation, per call
        original = serialization.load_pem_private_key

        def spy(data: bytes, password: bytes | None, *args: Any, **kw: Any) -> Any:
            self.calls.append(bool(kw.get("unsafe_skip_rsa_key_validation")))
            return original(data, password, *args, **kw)

        monkeypatch.setattr(serialization, "load_pem_private_key", spy)

    @property
    def validated(self) -> int:
        return sum(1 for skipped in self.calls if not skipped)


def hostile_keys(good: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Keys that once escaped as RecursionError or TypeError: (text, what the error says)."""
    return {
        "nested past the parser's depth": ("[" * 15000, "could not be read"),
        "nested in a field": (
            json.dumps(good)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}",
            "could not be read",
        ),
        "nested and huge": ("[" * 200000, "longer than 16 KiB"),
        "token_uri a list": (json.dumps({**good, "token_uri": [MARKER]}), "'token_uri'"),
        "token_uri an object": (json.dumps({**good, "token_uri": {MARKER: 1}}), "'token_uri'"),
        "private_key a list": (json.dumps({**good, "private_key": [MARKER]}), "'private_key'"),
        "private_key an object": (
            json.dumps({**good, "private_key": {MARKER: 1}}),
            "'private_key'",
        ),
        "client_email a list": (json.dumps({**good, "client_email": [MARKER]}), "client_email"),
        "private_key_id an object": (
            json.dumps({**good, "private_key_id": {MARKER: 1}}),
            "private_key_id",
        ),
        "type a list": (json.dumps({**good, "type": [MARKER]}), "'type'"),
        "oversized": (json.dumps({**good, "padding": MARKER * 2000}), "longer than 16 KiB"),
    }


def test_keys_that_broke_the_parser_are_refused_by_name(
    key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    good = service_account_key(key, None)
    credentials = Credentials()
    with caplog.at_level(logging.DEBUG):
        for case, (text, why) in hostile_keys(good).items():
            for attempt in range(2):  # the refusal is kept: the second one too is by name
                with pytest.raises(CredentialError) as err:
                    credentials.tokens(f"ns/{attempt}", text)
                assert why in str(err.value), (case, str(err.value))
                assert MARKER not in str(err.value) and "[[" not in str(err.value)
                assert err.value.__cause__ is None and err.value.__context__ is None
            with pytest.raises(CredentialError) as err:
                service_account(text, RemoteHosts())  # the same, called directly
            assert why in str(err.value), case
            assert err.value.__cause__ is None and err.value.__context__ is None
    assert MARKER not in caplog.text


def test_a_large_rsa_key_is_refused_without_validating_it(
    big_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    loads = Loads(monkeypatch)
    credentials = Credentials()
    with pytest.raises(CredentialError, match=r"8192-bit RSA 'private_key'.*2048 to 4096"):
        credentials.tokens("ns/big", json.dumps(service_account_key(big_key, None)))
    # Parsed once, and never through the full validation (4.8 s at 8192 bits, measured).
    assert loads.calls == [True]
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CredentialError, match="1024-bit"):
        credentials.tokens("ns/small", json.dumps(service_account_key(small, None)))
    curve = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CredentialError, match="not an RSA key"):
        credentials.tokens("ns/ec", json.dumps(service_account_key(curve, None)))  # type: ignore[arg-type]
    assert loads.validated == 0 and len(loads.calls) == 3


def test_a_key_named_by_several_backends_is_parsed_once(
    key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = Loads(monkeypatch)
    credentials = Credentials(LOCAL)
    text = json.dumps(service_account_key(key, "http://127.0.0.1:1/token"))
    a, b = credentials.tokens("team-a/v", text), credentials.tokens("team-b/v", text)
    assert a is not b  # tokens stay per backend ...
    assert a.account.signer is b.account.signer  # ... the parsed key is shared
    credentials.sweep()
    credentials.tokens("team-a/v", text)
    credentials.tokens("team-b/v", text)
    credentials.sweep()  # the rebuild after: the signer is kept while tokens use it
    c = credentials.tokens("team-c/v", text)  # a backend added later
    assert c.account.signer is a.account.signer
    assert loads.calls == [True] and credentials.signers.parsed == 1
    rotated = json.dumps(service_account_key(rsa_key(), "http://127.0.0.1:1/token"))
    credentials.tokens("team-a/v", rotated)
    assert credentials.signers.parsed == 2 and len(loads.calls) == 2
    credentials.sweep()
    credentials.tokens("team-a/v", rotated)
    credentials.sweep()
    assert len(credentials) == 1 and len(credentials.signers) == 1  # the old key is gone


def test_a_key_that_cannot_sign_fails_the_token_request_not_the_gateway(
    key: rsa.RSAPrivateKey,
) -> None:
    class Broken:
        key_id = None

        def sign(self, message: bytes) -> bytes:
            raise ValueError(MARKER)

    async def scenario() -> None:
        account = service_account(json.dumps(service_account_key(key, None)), RemoteHosts())
        tokens = AccessTokens(ServiceAccount(account.email, account.token_uri, Broken()))
        async with upstream_client() as client:
            with pytest.raises(UpstreamAuthError, match="could not sign") as err:
                await tokens.token(client)
        assert MARKER not in str(err.value) and err.value.__context__ is None

    asyncio.run(scenario())


def vertex_object(name: str) -> dict[str, Any]:
    spec = {
        "engine": "remote",
        "remote": {"baseURL": VERTEX_URL, "provider": "vertex", "model": "google/gemini"},
        "apiKeySecretRef": {"name": name, "key": "key.json"},
    }
    return {"metadata": {"name": name, "namespace": "team-a", "uid": name}, "spec": spec}


def test_a_broken_vertex_key_leaves_the_other_backends_routed(
    key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through KubeSource._rebuild: the keys that escaped it (and so froze every later
    rebuild) leave their own backend unrouted, named in the log once, and nothing else."""
    good = service_account_key(key, None)
    keys = {
        "good": json.dumps(good),
        "nested": "[" * 15000,
        "listed": json.dumps({**good, "token_uri": [MARKER]}),
        "boom": json.dumps(good) + " ",  # its parse raises what nothing expects (below)
    }
    src = KubeSource(object(), ["team-a"], require_keys=False)  # type: ignore[arg-type]
    src.backends[0].objects = {("team-a", n): vertex_object(n) for n in keys}
    src.backend_keys = {("team-a", n, "key.json"): text for n, text in keys.items()}
    tokens = src.credentials.tokens

    def unexpected(backend: str, text: str) -> AccessTokens:
        if backend == "team-a/boom":
            raise RuntimeError(MARKER)
        return tokens(backend, text)

    monkeypatch.setattr(src.credentials, "tokens", unexpected)
    with caplog.at_level(logging.WARNING):
        src._rebuild()
        src._rebuild()  # the same problems: not logged again
    routed = {b.id: b for bs in src.snapshot.routes.values() for b in bs}
    assert routed["team-a/good"].urls == (VERTEX_URL,) and routed["team-a/good"].auth is not None
    for name in ("nested", "listed", "boom"):
        assert routed.get(f"team-a/{name}") is None or routed[f"team-a/{name}"].urls == ()
    messages = sorted(r.getMessage() for r in caplog.records)
    assert messages == [
        "LLMBackend team-a/boom is not routed: its key (spec.apiKeySecretRef) could not be "
        "used (RuntimeError)",
        "LLMBackend team-a/listed is not routed: its service-account key "
        "(spec.apiKeySecretRef) names a 'token_uri' that is not "
        f"{GOOGLE_TOKEN_URI} and whose host is not an allowed remote host: the gateway "
        "sends its assertion nowhere else",
        "LLMBackend team-a/nested is not routed: its service-account key "
        "(spec.apiKeySecretRef) could not be read as a service-account key file",
    ]
    assert MARKER not in caplog.text and "PRIVATE KEY" not in caplog.text
    # A backend added later is routed: the rebuild is not stuck on the broken ones.
    src.backends[0].objects[("team-a", "later")] = vertex_object("later")
    src.backend_keys[("team-a", "later", "key.json")] = json.dumps(good)
    src._rebuild()
    routed = {b.id: b for bs in src.snapshot.routes.values() for b in bs}
    assert routed["team-a/later"].urls == (VERTEX_URL,)


def test_a_broken_vertex_key_in_the_file_leaves_the_others_routed(
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("GOOD", json.dumps(service_account_key(key, None)))
    monkeypatch.setenv("NESTED", "[" * 15000)
    monkeypatch.setenv("LISTED", json.dumps({**service_account_key(key, None), "token_uri": {}}))
    backends = [
        {
            "id": f"ns/{env.lower()}",
            "model": env.lower(),
            "baseURLs": [VERTEX_URL],
            "apiKeyEnv": env,
            "provider": "vertex",
        }
        for env in ("NESTED", "LISTED", "GOOD")
    ]
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"requireKeys": False, "backends": backends}))
    with caplog.at_level(logging.WARNING):
        src = FileSource(path)
    routed = {b.id: b for bs in src.snapshot.routes.values() for b in bs}
    assert routed["ns/good"].urls == (VERTEX_URL,) and routed["ns/good"].auth is not None
    assert all(routed[f"ns/{n}"].urls == () for n in ("nested", "listed") if f"ns/{n}" in routed)
    assert "ns/nested is not routed" in caplog.text and "ns/listed is not routed" in caplog.text
    assert "[[" not in caplog.text and "PRIVATE KEY" not in caplog.text
