"""An MCP server built with the official SDK, for the end-to-end tests: it records the
HTTP method, JSON-RPC method and Authorization header of every request it receives.

Usage: server.py PORT LOG_FILE
"""
import asyncio
import json
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

port, log_path = int(sys.argv[1]), sys.argv[2]
server = MCPServer("docs")


@server.tool()
def search_docs(query: str) -> str:
    return f"results for {query}"


@server.tool()
def delete_all() -> str:
    return "everything deleted"


@server.tool()
async def big_report(chunks: int, ctx: Context) -> str:
    for i in range(chunks):
        await ctx.report_progress(i + 1, chunks, f"chunk {i + 1}")
        await asyncio.sleep(0.2)
    return "".join(f"line {i:06d} of the report\n" for i in range(8000))


app = server.streamable_http_app()


class Recorder:
    """Wraps the app: one JSON line per request, before the SDK sees it."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            rpc = json.loads(body).get("method") if body else None
        except ValueError:
            rpc = "(not json)"
        with open(log_path, "a") as log:
            log.write(json.dumps({
                "method": scope["method"],
                "rpc": rpc,
                "authorization": headers.get("authorization"),
                "headers": sorted(headers),
            }) + "\n")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.inner(scope, replay, send)


uvicorn.run(Recorder(app), host="127.0.0.1", port=port, log_level="warning")
