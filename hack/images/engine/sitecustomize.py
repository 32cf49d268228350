"""fabric engine image: llama-server's /health and /metrics, added to llama_cpp.server.

On the engine's PYTHONPATH only (/app/llama-server sets PYTHONPATH=/app/shim and
FABRIC_ENGINE_SHIM=1):
- `GET /health` (and `/v1/health`), public: `{"status": "ok"}`. llama_cpp.server loads the
  model before it listens, so listening means loaded (llama-server answers 503 meanwhile).
- `GET /metrics`, with the API key when one is set (as llama-server's): llama-server's
  gauges `llamacpp:requests_processing` and `llamacpp:requests_deferred` (llama_cpp.server
  serves one request at a time: the one holding its model lock is processing, the others
  wait) and `fabric_engine_http_requests_total{path,code}`. Without `--metrics` it answers
  501, as llama-server does.
"""

import os

if os.environ.get("FABRIC_ENGINE_SHIM") == "1":
    import llama_cpp.server.app as _app
    from fastapi import Depends
    from fastapi.responses import JSONResponse, PlainTextResponse

    # The routes that wait for the model (llama_cpp.server's get_llama_proxy).
    _MODEL_PATHS = frozenset(
        (
            "/v1/completions",
            "/v1/engines/copilot-codex/completions",
            "/v1/embeddings",
            "/v1/chat/completions",
            "/v1/models",
            "/extras/tokenize",
            "/extras/tokenize/count",
            "/extras/detokenize",
        )
    )
    _create_app = _app.create_app

    def create_app(*args, **kwargs):
        app = _create_app(*args, **kwargs)
        metrics_on = os.environ.get("FABRIC_ENGINE_METRICS") == "1"
        waiting = {"n": 0}  # model requests in flight (processing + deferred)
        counts = {}

        class Track:
            """ASGI middleware: model requests count as in flight until their last body byte
            (a stream holds the model lock that long); then one count per path and status."""

            def __init__(self, inner):
                self.inner = inner

            async def __call__(self, scope, receive, send):
                if scope["type"] != "http":
                    return await self.inner(scope, receive, send)
                path = scope["path"]
                model = path in _MODEL_PATHS
                status = {"code": 500}

                async def sent(message):
                    if message["type"] == "http.response.start":
                        status["code"] = message["status"]
                    await send(message)

                waiting["n"] += model
                try:
                    await self.inner(scope, receive, sent)
                finally:
                    waiting["n"] -= model
                    # Unrouted paths (404) share one label: bounded label values.
                    key = (path if status["code"] != 404 else "other", status["code"])
                    counts[key] = counts.get(key, 0) + 1

        app.add_middleware(Track)

        @app.get("/health", include_in_schema=False)
        @app.get("/v1/health", include_in_schema=False)
        async def health():
            return {"status": "ok"}

        @app.get("/metrics", include_in_schema=False, dependencies=[Depends(_app.authenticate)])
        async def metrics():
            if not metrics_on:
                return JSONResponse(
                    {
                        "error": {
                            "code": 501,
                            "message": "This server does not support metrics endpoint. "
                            "Start it with `--metrics`",
                            "type": "not_supported_error",
                        }
                    },
                    status_code=501,
                )
            processing = 1 if _app.llama_inner_lock.locked() else 0
            deferred = max(0, waiting["n"] - processing)
            lines = [
                "# HELP llamacpp:requests_processing Number of requests processing.",
                "# TYPE llamacpp:requests_processing gauge",
                f"llamacpp:requests_processing {processing}",
                "# HELP llamacpp:requests_deferred Number of requests deferred.",
                "# TYPE llamacpp:requests_deferred gauge",
                f"llamacpp:requests_deferred {deferred}",
                "# HELP fabric_engine_http_requests_total HTTP requests answered, by path.",
                "# TYPE fabric_engine_http_requests_total counter",
            ] + [
                f'fabric_engine_http_requests_total{{path="{p}",code="{c}"}} {n}'
                for (p, c), n in sorted(counts.items())
            ]
            return PlainTextResponse(
                "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4"
            )

        return app

    _app.create_app = create_app
