"""Drives mcp-backend with the official Python SDK (mcp 2.x).

usage: python_client.py BASE_URL MODE   (MODE: legacy | 2026-07-28 | sse)

With MCP_BEARER set, every request carries `Authorization: Bearer $MCP_BEARER` (the SDK's own
header hooks: an httpx client with default headers, or `sse_client(headers=...)`).

Prints `nodes=<replicas that answered>` and `OK` when the session completed; exits 1 otherwise.
"""

import os
import re
import sys

import anyio
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

BEARER = os.environ.get("MCP_BEARER")
HEADERS = {"Authorization": f"Bearer {BEARER}"} if BEARER else None


def node_of(result) -> str:
    text = result.content[0].text
    match = re.search(r"\(from ([^)]+)\)", text)
    if not match:
        raise SystemExit(f"hello did not name its replica: {text!r}")
    return match.group(1)


async def session_calls(call_tool, list_tools) -> set:
    tools = [t.name for t in (await list_tools()).tools]
    for needed in ("hello", "echo", "calculator"):
        assert needed in tools, f"{needed} missing from tools/list: {tools}"
    nodes = set()
    for i in range(6):
        nodes.add(node_of(await call_tool("hello", {"name": f"py{i}"})))
    echo = await call_tool("echo", {"message": "round trip"})
    assert echo.content[0].text == "round trip", echo
    calc = await call_tool("calculator", {"operation": "multiply", "a": 6, "b": 7})
    assert calc.content[0].text == "42", calc
    return nodes


async def main(base: str, mode: str) -> None:
    if mode in ("legacy", "2026-07-28"):
        server = f"{base}/mcp"
        if HEADERS:
            server = streamable_http_client(server, http_client=create_mcp_http_client(headers=HEADERS))
        async with Client(server, mode=mode) as client:
            nodes = await session_calls(client.call_tool, client.list_tools)
            if mode == "legacy":
                # The counter lives with the session, whichever replica answers.
                values = []
                for _ in range(4):
                    r = await client.call_tool("counter", {"action": "increment"})
                    values.append(int(r.content[0].text))
                assert values == [1, 2, 3, 4], f"counter lost state across replicas: {values}"
    elif mode == "sse":
        async with sse_client(
            f"{base}/sse", headers=HEADERS, timeout=10.0, sse_read_timeout=60.0
        ) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                nodes = await session_calls(session.call_tool, session.list_tools)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(f"nodes={','.join(sorted(nodes))}")
    print("OK")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
