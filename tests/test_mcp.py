"""`--mcp`: the API endpoints as MCP tools (Gradio's MCP server at /gradio_api/mcp/), called with the MCP package's own
client as an agent would: the tools are listed with the request's fields, a plan and a generation come back."""
from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import read_video


def test_an_mcp_client_lists_plans_and_generates(tiny_models, tmp_path):
    import app
    from engine.cache import PipelineCache
    from engine.runner import Runner
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    runner = Runner(PipelineCache(max_size=1), outputs_dir=tmp_path)
    runner.previews = False
    ui = app.build_app(runner, queue_size=2)
    url = app.serve(ui, mcp=True)

    async def agent():
        async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name: t for t in (await session.list_tools()).tools}
                plan = await session.call_tool("plan_t2v", {"prompt": "a cat", "model": "tiny-wan"})
                video = await session.call_tool("generate_t2v", {"prompt": "a cat", "model": "tiny-wan", "steps": 2,
                                                                 "frames": 5, "resolution": "32x32", "seed": 3})
                refused = await session.call_tool("generate_t2v", {"prompt": "", "model": "tiny-wan"})
                return tools, plan, video, refused

    try:
        tools, plan, video, refused = asyncio.run(agent())
    finally:
        ui.demo.close()
    assert {"generate_t2v", "generate_i2v", "generate_v2v", "plan_t2v"} <= set(tools)
    assert {"prompt", "model", "steps", "loras", "context_parallel"} <= set(tools["generate_t2v"].inputSchema["properties"])
    assert not plan.isError and plan.content[0].text.startswith("**Plan:** offload none")
    text = " ".join(getattr(c, "text", "") for c in video.content)
    assert not video.isError and ".mp4" in text, text
    made = [p for p in Path(tmp_path).glob("*.mp4")]
    assert len(made) == 1 and read_video(made[0]).shape[0] == 5
    assert refused.isError and "prompt is empty" in " ".join(getattr(c, "text", "") for c in refused.content)
