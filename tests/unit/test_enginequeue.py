"""Engines' own queue gauges in the demand: parsed from their metrics pages, reported on
/load beside the gateway's counts, and combined by the autoscaler without counting a
request twice."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from fabric_operator.api.backend import LLMBackend
from fabric_operator.autoscaler.signal import Demand, Report, Signal, parse_report
from fabric_operator.gateway.enginequeue import (
    MAX_CHUNKS,
    QUEUE_GAUGES,
    EngineQueues,
    metrics_url,
    queue_depth,
)
from fabric_operator.gateway.load import Load
from fabric_operator.gateway.routes import Backend, Snapshot, backend_from_object
from fabric_operator.localcluster import free_port

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.7
"""
TGI_PAGE = """\
# TYPE tgi_queue_size gauge
tgi_queue_size 4
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 8
# TYPE tgi_request_count counter
tgi_request_count 1000
"""
LLAMACPP_PAGE = """\
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""

# SGLang labels its gauges with the model (srt/metrics/collector.py).
SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen"} 5.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen"} 7.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen"} 0.4
"""


@pytest.mark.parametrize(
    ("engine", "page", "depth"),
    [
        ("vllm", VLLM_PAGE, 8),
        ("tgi", TGI_PAGE, 12),
        ("llamacpp", LLAMACPP_PAGE, 3),
        ("sglang", SGLANG_PAGE, 12),
    ],
)
def test_each_engines_gauges_are_summed(engine: str, page: str, depth: int) -> None:
    assert queue_depth(page, QUEUE_GAUGES[engine]) == depth
    # Another engine's page is no reading at all (not a zero).
    other = next(e for e in QUEUE_GAUGES if e != engine)
    assert queue_depth(page, QUEUE_GAUGES[other]) is None


def test_samples_of_several_models_add_up_and_nonsense_is_ignored() -> None:
    page = VLLM_PAGE + (
        'vllm:num_requests_running{engine="1",model_name="lora"} 2.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="lora"} NaN\n'
        'vllm:num_requests_waiting{engine="2",model_name="x"} -4\n'
    )
    assert queue_depth(page, QUEUE_GAUGES["vllm"]) == 10
    huge = "tgi_queue_size 1e30\n"
    assert queue_depth(huge, QUEUE_GAUGES["tgi"]) == 1_000_000
    assert queue_depth("", QUEUE_GAUGES["tgi"]) is None


def test_only_the_wanted_lines_are_read() -> None:
    # Not a metrics page at all: no reading (and no time spent parsing the rest).
    assert queue_depth("<html>not metrics</html>\n{{{", QUEUE_GAUGES["vllm"]) is None
    # A longer name that begins like a wanted one is another gauge; labels with spaces
    # and braces in their values, and a timestamp, are read right.
    page = (
        "tgi_queue_size_total 99\n"
        'tgi_queue_size{model="a } b", x="{"} 2 1700000000000\n'
        "tgi_batch_current_size 3\n"
    )
    assert queue_depth(page, QUEUE_GAUGES["tgi"]) == 5
    with pytest.raises(ValueError):
        queue_depth("tgi_queue_size lots\n", QUEUE_GAUGES["tgi"])
    with pytest.raises(ValueError):
        queue_depth("tgi_queue_size\n", QUEUE_GAUGES["tgi"])


def test_metrics_url_of_a_pod() -> None:
    assert metrics_url("http://10.200.0.7:8000/v1") == "http://10.200.0.7:8000/metrics"


def _route(spec: dict[str, Any], **kw: Any) -> Any:
    obj = {
        "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
        "spec": spec,
    }
    endpoints = {
        "subsets": [
            {"addresses": [{"ip": "10.200.0.7"}], "ports": [{"name": "http", "port": 8000}]}
        ]
    }
    return backend_from_object(obj, endpoints, None, **kw)


SCALED = {"autoscaling": {"minReplicas": 0, "maxReplicas": 3}}


@pytest.mark.parametrize(
    ("spec", "gauges"),
    [
        (
            {"engine": "vllm", "model": {"huggingface": {"repo": "o/r"}}, **SCALED},
            QUEUE_GAUGES["vllm"],
        ),
        (
            {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}, **SCALED},
            QUEUE_GAUGES["llamacpp"],
        ),
        ({"engine": "ollama", "model": {"ollama": "qwen3"}, **SCALED}, None),  # none to read
        ({"engine": "vllm", "model": {"huggingface": {"repo": "o/r"}}}, None),  # not scaled
    ],
)
def test_routes_read_gauges_of_autoscaled_backends_only(
    spec: dict[str, Any], gauges: tuple[str, ...] | None
) -> None:
    LLMBackend.from_manifest({"metadata": {"name": "m"}, "spec": spec})  # a valid spec
    route = _route(spec)
    assert route is not None and route.urls
    assert route.queue_gauges == gauges
    # Through the Service, one page would stand for every pod: not read.
    assert _route(spec, via_service=True).queue_gauges is None


def test_load_reports_the_engine_figure_and_wakes_watchers() -> None:
    async def scenario() -> None:
        load = Load("gw-1")
        stream = load.watch()
        assert json.loads(await anext(stream)) == {"gateway": "gw-1", "backends": {}}
        load.set_engine("ns/a", 4)
        line = await asyncio.wait_for(anext(stream), 2)
        assert json.loads(line)["backends"] == {"ns/a": {"inFlight": 0, "held": 0, "engine": 4}}
        load.enter("ns/a")
        assert load.report()["backends"] == {"ns/a": {"inFlight": 1, "held": 0, "engine": 4}}
        load.set_engine("ns/a", None)
        assert load.report()["backends"] == {"ns/a": {"inFlight": 1, "held": 0}}
        assert load.engine_backends() == set()
        await stream.aclose()

    asyncio.run(scenario())


def test_demand_counts_a_request_once_and_bypassing_ones_too() -> None:
    # 3 through the gateway, the engine reports 8 (3 of them + 5 sent to the Service).
    assert Demand(in_flight=3, held=0, engine=8).total == 8
    # The engine has not seen the gateway's yet (a scrape is up to 2 s old): 3.
    assert Demand(in_flight=3, held=0, engine=1).total == 3
    # Held requests are at no engine: added.
    assert Demand(in_flight=0, held=2, engine=4).total == 6


def test_the_signal_takes_one_engine_reading_not_the_sum_of_the_gateways() -> None:
    changes: list[Any] = []
    signal = Signal(changes.append, clock=lambda: 0.0)
    signal.update("a", Report("gw-a", {"ns/m": Demand(2, 0, 7)}))
    signal.update("b", Report("gw-b", {"ns/m": Demand(1, 1, 6)}))
    assert signal.demand("ns/m") == Demand(3, 1, 7)
    assert signal.demand("ns/m").total == 8  # 1 held + max(3 in flight, 7 at the engine)


def test_reports_carry_the_engine_figure_and_refuse_a_bad_one() -> None:
    report = parse_report('{"gateway": "g", "backends": {"ns/m": {"inFlight": 1, "engine": 9}}}')
    assert report.backends["ns/m"] == Demand(1, 0, 9)
    old = parse_report('{"gateway": "g", "backends": {"ns/m": {"inFlight": 1, "held": 2}}}')
    assert old.backends["ns/m"] == Demand(1, 2, 0)  # a gateway of the release before
    for bad in ("9", -1, True, 1e99):
        line = json.dumps({"gateway": "g", "backends": {"ns/m": {"engine": bad}}})
        with pytest.raises(ValueError):
            parse_report(line)


# ---- pods of a hostile (or broken) team: each handler counts its reads in the app ----


READS = web.AppKey("reads", dict[str, int])
KEYS = web.AppKey("keys", list[str | None])
ENCODINGS = web.AppKey("encodings", list[str | None])


def _counted(request: web.Request, name: str) -> None:
    reads = request.app[READS]
    reads[name] = reads.get(name, 0) + 1


async def _good(request: web.Request) -> web.Response:
    _counted(request, "good")
    request.app[KEYS].append(request.headers.get("authorization"))
    request.app[ENCODINGS].append(request.headers.get("accept-encoding"))
    return web.Response(text=LLAMACPP_PAGE)


async def _garbage(request: web.Request) -> web.Response:
    _counted(request, "garbage")
    return web.Response(text="llamacpp:requests_processing NaN-ish {{{\n")


async def _huge(request: web.Request) -> web.Response:
    _counted(request, "huge")
    return web.Response(text="llamacpp:requests_processing 1\n" * 20_000)  # ~640 KiB


async def _slow(request: web.Request) -> web.Response:
    _counted(request, "slow")
    await asyncio.sleep(2)  # past the 1 s a whole read may take
    return web.Response(text=LLAMACPP_PAGE)


async def _drip(request: web.Request) -> web.StreamResponse:
    """One piece every millisecond: many pieces, and never done within the second."""
    _counted(request, "drip")
    resp = web.StreamResponse()
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):  # the reader gives up first
        for _ in range(5000):
            await resp.write(b"# ")
            await asyncio.sleep(0.001)
    return resp


async def _bomb(request: web.Request) -> web.Response:
    _counted(request, "bomb")
    packed = gzip.compress(gzip.compress(b"0" * (64 * 1024 * 1024)))
    return web.Response(body=packed, headers={"content-encoding": "gzip, gzip"})


HOSTILE = {
    "good": _good,
    "garbage": _garbage,
    "huge": _huge,
    "slow": _slow,
    "drip": _drip,
    "bomb": _bomb,
}


def test_a_hostile_or_broken_pod_costs_a_failed_read_not_the_gateway() -> None:
    """A team runs what image it likes: its pods' pages may be garbage, huge, slow to
    start or to end, or a compression bomb. The good pod's figure counts; each other one
    is a failed read, bounded in time and bytes, and is not read again for a while."""

    async def scenario() -> None:
        app = web.Application()
        app[READS], app[KEYS], app[ENCODINGS] = {}, [], []
        for name, handler in HOSTILE.items():
            app.router.add_get(f"/{name}/metrics", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        backend = Backend(
            id="ns/m",
            model="m",
            urls=tuple(f"http://127.0.0.1:{port}/{n}/v1" for n in HOSTILE),
            api_key="sk-engine",
            queue_gauges=QUEUE_GAUGES["llamacpp"],
        )
        load, now = Load("gw"), [0.0]
        queues = EngineQueues(
            lambda: Snapshot(by_id={backend.id: backend}), load, clock=lambda: now[0]
        )
        try:
            started = time.monotonic()
            await queues.scrape_once()
            took = time.monotonic() - started
            assert load.report()["backends"] == {"ns/m": {"inFlight": 0, "held": 0, "engine": 3}}
            assert queues.failures == len(HOSTILE) - 1
            assert took < 2.5, took  # every read bounded to 1 s, read side by side
            assert app[KEYS] == ["Bearer sk-engine"]  # the backend's own key, to its pod
            assert app[ENCODINGS] == ["identity"]
            # The failed pods are skipped for a while; the good one is read again.
            await queues.scrape_once()
            reads = app[READS]
            assert reads["good"] == 2 and all(reads[n] == 1 for n in HOSTILE if n != "good")
            now[0] = 31.0
            await queues.scrape_once()
            assert reads["garbage"] == 2
            # The backend gone from the routes: its figure goes too.
            queues.snapshot = Snapshot
            await queues.scrape_once()
            assert load.report()["backends"] == {}
        finally:
            await queues.client.aclose()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_page_in_too_many_pieces_is_refused() -> None:
    """Each piece costs the shared loop: a page is refused past MAX_CHUNKS of them."""

    class Pieces(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for _ in range(MAX_CHUNKS + 1):
                yield b"#"

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Pieces())

    async def scenario() -> None:
        backend = Backend(
            id="ns/m",
            model="m",
            urls=("http://127.0.0.1:9/v1",),
            queue_gauges=QUEUE_GAUGES["tgi"],
        )
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        queues = EngineQueues(
            lambda: Snapshot(by_id={backend.id: backend}), Load("gw"), client=client
        )
        await queues.scrape_once()
        assert queues.failures == 1
        await client.aclose()

    asyncio.run(scenario())


def test_a_backends_figure_is_capped_and_the_operator_never_refuses_it() -> None:
    # Eleven pods each saying a million: one figure, capped, in a line the operator reads.
    assert queue_depth("tgi_queue_size 1e6\n" * 11, QUEUE_GAUGES["tgi"]) == 1_000_000
    line = json.dumps(
        {
            "gateway": "g",
            "backends": {"a/x": {"engine": 10**12}, "b/y": {"inFlight": 2}},
        }
    )
    report = parse_report(line)
    assert report.backends["a/x"].engine == 10_000_000
    assert report.backends["b/y"] == Demand(2, 0, 0)  # another team's counts still count


def test_a_failing_round_clears_the_figures_and_the_loop_goes_on() -> None:
    async def scenario() -> None:
        load = Load("gw")
        load.set_engine("ns/m", 5)
        rounds = [0]

        def snapshot() -> Snapshot:
            rounds[0] += 1
            if rounds[0] == 1:
                raise RuntimeError("a bug")
            return Snapshot()

        queues = EngineQueues(snapshot, load, interval=0.01)
        task = asyncio.create_task(queues.run())
        while rounds[0] < 3:
            await asyncio.sleep(0.01)
        assert load.engine_backends() == set()  # nothing frozen at its last value
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert queues.client.is_closed

    asyncio.run(scenario())
