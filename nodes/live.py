"""The live state of the training nodes, for the web extension (web/shortft.js): kept here while a node trains,
sent to the queueing client as ``shortft.progress`` websocket events, and served over HTTP so a page reloaded in the
middle of a run rebuilds its reward chart.

``GET /shortft/live`` (also under ``/api``) answers ``{"nodes": {node id: state}}``; ``?node=ID`` narrows it to one
node. A state holds run, method, reward_name, iterations, status, phase, prompt_id, points (iteration, reward, loss,
stage, seconds), evals (iteration, seconds, reward means and stds) and previews (how many preview images were made).
``GET /shortft/live/preview?node=ID`` answers the latest preview as a JPEG (404 when there is none).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

LIVE_ROUTE = "/shortft/live"
PREVIEW_ROUTE = "/shortft/live/preview"
PROGRESS_EVENT = "shortft.progress"

_LIVE: dict[str, dict[str, Any]] = {}  # node id -> its latest state
_PREVIEWS: dict[str, bytes] = {}  # node id -> its latest preview image (JPEG bytes)
_LOCK = threading.Lock()
_registered = False


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "points": list(entry.get("points", [])), "evals": [dict(e) for e in entry.get("evals", [])]}


def live_state(node_id: str | None = None) -> dict[str, Any]:
    """A copy of the live state (of one node, or of all), safe to serialise while training goes on."""
    with _LOCK:
        if node_id is not None:
            return _copy(_LIVE[node_id]) if node_id in _LIVE else {}
        return {k: _copy(v) for k, v in _LIVE.items()}


def live_preview(node_id: str) -> bytes | None:
    """The latest preview image of a training node as JPEG bytes, or None."""
    with _LOCK:
        return _PREVIEWS.get(node_id)


def begin(node_id: str, state: dict[str, Any]) -> None:
    """A node starts a run: its state is ``state`` with no points, evaluations nor preview yet."""
    with _LOCK:
        _LIVE[node_id] = {**json_safe(state), "points": [], "evals": [], "previews": 0}
        _PREVIEWS.pop(node_id, None)


def update(node_id: str, **fields: Any) -> None:
    """Set fields of a node's state (phase, status ...)."""
    with _LOCK:
        _LIVE[node_id].update(json_safe(fields))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN nor infinity, and browsers reject the
    ``NaN`` Python's json writes, which would lose a whole event or live state (a diverging run's loss); the chart
    skips nulls."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append(node_id: str, key: str, item: dict[str, Any]) -> None:
    """Add a point (``key`` "points") or an evaluation ("evals") to a node's state."""
    with _LOCK:
        _LIVE[node_id][key].append(json_safe(dict(item)))


def set_preview(node_id: str, jpeg: bytes, iteration: int) -> None:
    """A node's latest preview image and the iteration it shows."""
    with _LOCK:
        _PREVIEWS[node_id] = jpeg
        entry = _LIVE[node_id]
        entry["previews"] = entry.get("previews", 0) + 1
        entry["preview_iteration"] = iteration


def prompt_id() -> str | None:
    """The id of the prompt being executed (None outside a ComfyUI server)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None
    context = get_executing_context()
    if context is not None:
        return context.prompt_id
    server = getattr(PromptServer, "instance", None)
    return getattr(server, "last_prompt_id", None)


def send(event: dict[str, Any]) -> None:
    """One ``shortft.progress`` message, with its prompt id, to the client that queued the prompt (thread-safe;
    nothing when no server runs)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    server.send_sync(PROGRESS_EVENT, json_safe({"prompt_id": prompt_id(), **event}), server.client_id)


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
