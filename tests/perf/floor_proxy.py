"""The floor under the appliance's CPU budget: Sanic and aiohttp alone, proxying one path to one upstream.

    python tests/perf/floor_proxy.py --port 8200 --upstream http://127.0.0.1:8100 --workers 2

What a gateway on this stack cannot go below: no keys, limits, routing, accounting, metrics or logs; the body
passes through unread both ways (streams chunk by chunk). bench.py's `--floor` runs it as the target `floor`
beside the appliance, so "appliance - floor" is the CPU the appliance's own code adds per request, measured in
the same rounds. Workers are forked, as the appliance's are.
"""

from __future__ import annotations

import argparse

import aiohttp
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw


def build(upstream: str) -> Sanic:
    app = Sanic("floor")
    app.config.update(ACCESS_LOG=False, MOTD=False, NOISY_EXCEPTIONS=False)

    @app.before_server_start
    async def open_session(app: Sanic) -> None:
        app.ctx.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    @app.after_server_stop
    async def close_session(app: Sanic) -> None:
        await app.ctx.session.close()

    @app.get("/ready")
    async def ready(_request: Request) -> HTTPResponse:
        return json({"status": "ready"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> HTTPResponse | None:
        async with app.ctx.session.post(upstream + "/v1/chat/completions", data=request.body,
                                        headers={"Content-Type": "application/json"}) as answer:
            content_type = answer.headers.get("Content-Type", "application/json")
            if not content_type.startswith("text/event-stream"):
                return raw(await answer.read(), status=answer.status, content_type=content_type)
            stream = await request.respond(status=answer.status, content_type=content_type)
            async for chunk in answer.content.iter_any():
                await stream.send(chunk)
            await stream.eof()
        return None

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the mock's base URL, without /v1")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    Sanic.start_method = "fork"
    app = build(args.upstream.rstrip("/"))
    app.run(host="127.0.0.1", port=args.port, workers=args.workers, access_log=False, motd=False,
            single_process=args.workers == 1)


if __name__ == "__main__":
    main()
