"""HTTP routes of the web extension (web/shortft.js): the live state of the training nodes, so a page reloaded in
the middle of a run rebuilds its reward chart, and the latest preview image of each node.

``GET /shortft/live`` (also under ``/api``) answers ``{"nodes": {node id: state}}``; ``?node=ID`` narrows it to one
node. A state is what :func:`nodes.train.live_state` keeps: run, method, reward_name, iterations, status, phase,
prompt_id, points (iteration, reward, loss, stage, seconds), evals (iteration, seconds, reward means and stds) and
previews (how many preview images were made). ``GET /shortft/live/preview?node=ID`` answers the latest preview as
a JPEG (404 when there is none).
"""

from __future__ import annotations

import logging

from aiohttp import web

from .train import live_preview, live_state

log = logging.getLogger(__name__)

LIVE_ROUTE = "/shortft/live"
PREVIEW_ROUTE = "/shortft/live/preview"
_registered = False


async def get_live(request: web.Request) -> web.Response:
    node = request.query.get("node")
    if node is None:
        nodes = live_state()
    else:
        state = live_state(node)
        nodes = {node: state} if state else {}
    return web.json_response({"nodes": nodes}, headers={"Cache-Control": "no-store"})


async def get_preview(request: web.Request) -> web.Response:
    node = request.query.get("node", "")
    data = live_preview(node)
    if data is None:
        return web.json_response({"error": f"no preview for node {node!r}"}, status=404)
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "no-store"})


def register_routes() -> bool:
    """Add the routes to ComfyUI's PromptServer (before it builds its app; once per process). False when no
    server runs (the pack imported outside ComfyUI's main)."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        log.debug("ShortFT: no PromptServer; %s not registered", LIVE_ROUTE)
        return False
    server.routes.get(LIVE_ROUTE)(get_live)
    server.routes.get(PREVIEW_ROUTE)(get_preview)
    _registered = True
    return True
