"""Serving efficiency: routing strategies over real engine replicas, and how fast the
autoscaler's decision follows a load step.

    PYTHONPATH=operator:. .venv/bin/python -m bench.serving              # ~4 min
    PYTHONPATH=operator:. .venv/bin/python -m bench.serving --conversations 2 --turns 2 --smoke

Routing: two (`--replicas`) llama-cpp-python servers (the engine the suite builds,
`hack/get-tiny-engine.sh`) with their prompt cache on (`--cache true`), serving a
random-weight model the run writes itself, large enough that prefilling a long system
prompt takes visible time on this CPU. A multi-turn workload: each conversation has its
own long system prompt, turns are sent one after another (each resends the conversation
so far), `--concurrency` conversations at a time, streamed (time to first token is the
time to the first content chunk). Compared:

- round-robin straight to the replicas, as a Service (kube-proxy) spreads connections;
- the gateway, LeastInFlight (its default);
- the gateway, PrefixAffinity: a conversation's turns reach the replica whose cache
  holds its prefix.

Autoscaler: the pure decision (autoscaler/policy.py) fed a 0 -> 6 x target step as the
gateways' streams would (a reading every 50 ms), on a simulated clock: how long until
the desired replicas are right (KubeAI's zero-filled 10-minute window needs minutes).
The write that follows is measured on a real API server by
tests/integration/test_autoscaler.py, and cold start from zero on a real node by
tests/e2e/test_in_cluster.py; bench/README.md lists both.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.support.engine import run_llama_server
from tests.support.gateway import gateway
from tests.support.tiny_model import write_tiny_gguf
from tests.support.upstream import REPO

from fabric_operator.api.v1alpha1 import Autoscaling
from fabric_operator.autoscaler.policy import Policy, State, decide

KEY = "sk-bench-serving"
MODEL = "m"
# Sizes where prefilling ~1,500 tokens costs a visible share of a second on 2 cores.
SIZES = {"embd": 256, "heads": 4, "blocks": 6, "ff": 768, "ctx": 4096}
TARGETS = {"autoscaler_step_s": 10.0}


@dataclass
class Sample:
    conversation: int
    turn: int
    ttft: float
    total: float
    ok: bool


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    def ttfts(self, later_turns: bool) -> list[float]:
        return [s.ttft for s in self.samples if s.ok and (s.turn > 0) == later_turns]

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]

        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        later = self.ttfts(True)
        return {
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "ttft_p50_ms": pct([s.ttft for s in ok], 0.5),
            "ttft_p99_ms": pct([s.ttft for s in ok], 0.99),
            "later_turns_ttft_p50_ms": pct(later, 0.5),
            "first_turn_ttft_p50_ms": pct(self.ttfts(False), 0.5),
            "requests_per_s": round(len(ok) / self.seconds, 2) if self.seconds else None,
            "seconds": round(self.seconds, 1),
        }


def system_prompt(conversation: int, characters: int) -> str:
    words = itertools.cycle(["alpha", "beta", "gamma", "delta", "omega", "sigma", "tau"])
    text = f"You are assistant {conversation}. "
    while len(text) < characters:
        text += f"{next(words)} {conversation} "
    return text[:characters]


def turn_messages(conversation: int, turn: int, prompt_chars: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt(conversation, prompt_chars)}]
    for t in range(turn + 1):
        messages.append({"role": "user", "content": f"question {t} of {conversation}"})
        if t < turn:
            messages.append({"role": "assistant", "content": f"answer {t}"})
    return messages


def one_turn(url: str, key: str | None, messages: list[dict[str, str]]) -> tuple[float, float]:
    """(time to first content chunk, total) of one streamed chat completion."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": True}
    start = time.perf_counter()
    first: float | None = None
    with httpx.stream(
        "POST", url + "/chat/completions", json=body, headers=headers, timeout=120
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (first if first is not None else total), total


@dataclass(frozen=True)
class Shape:
    conversations: int
    turns: int
    concurrency: int
    prompt_chars: int


def workload(name: str, pick: Callable[[], str], key: str | None, shape: Shape) -> Run:
    run = Run(name)
    lock = threading.Lock()

    def conversation(c: int) -> None:
        for t in range(shape.turns):
            try:
                ttft, total = one_turn(pick(), key, turn_messages(c, t, shape.prompt_chars))
                sample = Sample(c, t, ttft, total, True)
            except httpx.HTTPError:
                sample = Sample(c, t, 0.0, 0.0, False)
            with lock:
                run.samples.append(sample)

    started = time.perf_counter()
    with ThreadPoolExecutor(shape.concurrency) as pool:
        list(pool.map(conversation, range(shape.conversations)))
    run.seconds = time.perf_counter() - started
    return run


class RoundRobin:
    """The replicas in turn, per request (kube-proxy spreads connections so)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls, self._turn, self._lock = urls, itertools.count(), threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            return self.urls[next(self._turn) % len(self.urls)]


@contextlib.contextmanager
def replicas(model: Path, n: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                run_llama_server(
                    model,
                    alias=MODEL,
                    n_ctx=SIZES["ctx"],
                    extra_args=("--cache", "true"),
                    timeout=120,
                )
            )
            for _ in range(n)
        ]
        yield [s.base_url for s in servers]


def warm(urls: list[str]) -> None:
    """One short request per replica: the first request of a process costs extra."""
    for url in urls:
        one_turn(url, None, [{"role": "user", "content": "warm up"}])


def through_gateway(
    workdir: Path, urls: list[str], routing: dict[str, Any] | None
) -> contextlib.AbstractContextManager[Any]:
    backend: dict[str, Any] = {"id": "bench/m", "model": MODEL, "baseURLs": urls}
    if routing:
        backend["routing"] = routing
    return gateway(
        "--no-access-log",
        config={
            "backends": [backend],
            "tenants": [{"name": "bench", "keyEnv": "BENCH_KEY", "models": ["*"]}],
        },
        env={"BENCH_KEY": KEY},
        workdir=workdir,
    )


def autoscaler_step(target: int = 4, step_to: int = 6) -> dict[str, Any]:
    """Seconds from a 0 -> step_to x target step until desired == step_to, on a state that
    watched a quiet backend for a stable window first (a reading every 50 ms)."""
    policy = Policy.from_spec(Autoscaling(min_replicas=0, max_replicas=20, target_requests=target))
    state, now, current = State(), 1_000_000.0, 1
    for _ in range(int(60 / 0.05)):  # a quiet minute at one request in flight
        state.observe(now, 1)
        current = decide(
            policy, state, now, current_replicas=current, ready_replicas=current, held=0
        ).desired
        now += 0.05
    step_at, steps = now, []
    while now - step_at < 120:
        state.observe(now, step_to * target)
        desired = decide(
            policy, state, now, current_replicas=current, ready_replicas=current, held=0
        ).desired
        if desired != current:
            steps.append((round(now - step_at, 2), desired))
            current = desired
        if current == step_to:
            break
        now += 0.05
    return {
        "step": f"{target} -> {step_to * target} requests in flight, target {target}/replica",
        "seconds_to_desired": round(now - step_at, 2),
        "replica_changes": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-chars", type=int, default=1500, help="system prompt size")
    parser.add_argument("--smoke", action="store_true", help="the tiny model (CI)")
    parser.add_argument("--json", default=str(REPO / "bench" / "serving-results.json"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"autoscaler": autoscaler_step()}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        sizes = {} if args.smoke else SIZES
        made = time.perf_counter()
        model = write_tiny_gguf(work / "model.gguf", **sizes)
        results["model"] = {**(sizes or {"tiny": True}), "mb": model.stat().st_size >> 20}
        print(f"model {results['model']} written in {time.perf_counter() - made:.1f}s")
        runs: list[Run] = []
        shape = Shape(args.conversations, args.turns, args.concurrency, args.prompt_chars)
        strategies: list[tuple[str, dict[str, Any] | None]] = [
            ("round-robin (direct, as a Service)", None),
            ("gateway LeastInFlight", {"strategy": "LeastInFlight"}),
            ("gateway PrefixAffinity", {"strategy": "PrefixAffinity"}),
        ]
        for name, routing in strategies:
            # Fresh replicas for each: no strategy inherits the caches another filled.
            with replicas(model, args.replicas) as urls:
                warm(urls)
                if routing is None:
                    runs.append(workload(name, RoundRobin(urls), None, shape))
                    continue
                sub = work / routing["strategy"]
                sub.mkdir()
                with through_gateway(sub, urls, routing) as gw:
                    runs.append(workload(name, functools.partial(str, gw.url + "/v1"), KEY, shape))
        results["routing"] = {r.name: r.summary() for r in runs}
    results["workload"] = {
        "replicas": args.replicas,
        "conversations": args.conversations,
        "turns": args.turns,
        "concurrency": args.concurrency,
        "system_prompt_chars": args.prompt_chars,
    }
    print(f"\n{'routing':38} {'TTFT p50':>9} {'p99':>7} {'later p50':>10} {'req/s':>6} errors")
    for name, s in results["routing"].items():
        print(
            f"{name:38} {s['ttft_p50_ms']!s:>9} {s['ttft_p99_ms']!s:>7} "
            f"{s['later_turns_ttft_p50_ms']!s:>10} {s['requests_per_s']!s:>6} {s['errors']}"
        )
    a = results["autoscaler"]
    print(
        f"\nautoscaler: {a['step']}: desired right after {a['seconds_to_desired']} s "
        f"(target <= {TARGETS['autoscaler_step_s']:g} s); changes {a['replica_changes']}"
    )
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"written to {args.json}")
    return 0 if all(s["errors"] == 0 for s in results["routing"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
