"""An agent using the official MCP SDK's client through the gateway.

Usage: agent.py URL PROXY_KEY
Prints a JSON report of what each step came to.
"""
import json
import sys
import time

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

url, key = sys.argv[1:3]


async def main():
    report = {}
    progress = []

    async def on_progress(done, total, message):
        progress.append(time.monotonic())

    def refusal(e):
        return {"code": e.code, "message": e.message, "data": e.data}

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                              timeout=httpx2.Timeout(30, read=60))
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=20) as session:
            init = await session.initialize()
            report["server"] = init.server_info.name
            report["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            result = await session.call_tool("search_docs", {"query": "envoy"})
            report["search"] = result.content[0].text
            try:
                await session.call_tool("delete_all", {})
                report["delete"] = "ran"
            except MCPError as e:
                report["delete"] = refusal(e)
            started = time.monotonic()
            result = await session.call_tool("big_report", {"chunks": 5},
                                             progress_callback=on_progress)
            report["report_bytes"] = len(result.content[0].text)
            report["progress_at"] = [round(t - started, 3) for t in progress]
            searches = []
            for i in range(3):
                try:
                    await session.call_tool("search_docs", {"query": f"q{i}"})
                    searches.append("ok")
                except MCPError as e:
                    searches.append(refusal(e))
            report["more_searches"] = searches
            # The session still works after refusals.
            report["after"] = (await session.call_tool("big_report", {"chunks": 1})).is_error
    print(json.dumps(report))


anyio.run(main)
