"""Tier-2 harness: a real ComfyUI server with this repository linked in as a custom node, driven over HTTP and its
websocket like any client.

``find_comfyui`` looks for a checkout, ``missing_requirements`` checks that this interpreter holds ComfyUI's
requirements, and ``ComfyServer`` runs ``main.py`` from the (read-only) checkout on a temporary base directory:
everything ComfyUI writes (models, input, output, user, temp) goes there, never into the checkout.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-shortft"
MODEL_FOLDERS = ("checkpoints", "loras", "diffusers", "reward_models")
TORCHAUDIO_PIN = "torchaudio==2.11.0"  # the torchaudio build that fits the README's torch 2.14.1
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def find_comfyui() -> tuple[Path | None, str]:
    """The ComfyUI checkout to test against and a sentence saying where it was found or every place looked.

    ``$COMFYUI_PATH`` when set (and then only it), else ``<repo>/../shared/comfyui``, else ``~/comfy/ComfyUI``.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        places = [("$COMFYUI_PATH", Path(env).expanduser())]
    else:
        places = [("<repo>/../shared/comfyui", REPO.parent / "shared" / "comfyui"),
                  ("~/comfy/ComfyUI", Path.home() / "comfy" / "ComfyUI")]
    for label, path in places:
        if (path / "main.py").is_file() and (path / "comfy" / "sd.py").is_file():
            return path.resolve(), f"ComfyUI checkout at {path} ({label})"
    looked = ", ".join(f"{path} ({label})" for label, path in places)
    return None, (f"no ComfyUI checkout (looked at {looked}): set COMFYUI_PATH to a ComfyUI source tree or clone "
                  "ComfyUI to ~/comfy/ComfyUI")


def _requirements(comfy: Path) -> list[tuple[str, bool]]:
    """(requirement line, essential) for each line of ComfyUI's requirements.txt, comments dropped."""
    out, essential = [], True
    for raw in (comfy / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if "non essential" in line.lower():
                essential = False
            continue
        line = line.split(" #", 1)[0].strip()
        if line:
            out.append((line, essential))
    return out


def missing_requirements(comfy: Path) -> list[str]:
    """ComfyUI's requirements this interpreter lacks or holds at a version outside the requirement (the optional
    ones below the "#non essential" comment only when installed at a wrong version)."""
    from packaging.requirements import Requirement

    missing = []
    for line, essential in _requirements(comfy):
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if essential:
                missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{line} (found {version})")
    return missing


def requirements_skip_reason(comfy: Path) -> str | None:
    """Why this interpreter cannot run the ComfyUI at ``comfy`` (what is missing and the pip command), or None."""
    missing = missing_requirements(comfy)
    if not missing:
        return None
    return (f"{sys.executable} lacks ComfyUI's requirements: {', '.join(missing)}; install them with: "
            f"{sys.executable} -m pip install -r {comfy / 'requirements.txt'} {TORCHAUDIO_PIN}")


def comfyui_or_skip() -> Path:
    """The ComfyUI checkout to test against, or a pytest skip naming what is missing (the checkout, or ComfyUI's
    requirements in this interpreter)."""
    import pytest

    comfy, where = find_comfyui()
    if comfy is None:
        pytest.skip(where)
    reason = requirements_skip_reason(comfy)
    if reason is not None:
        pytest.skip(reason)
    return comfy


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file and folder under ``root``: compare two states to see what was written."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            state[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size)
    return state


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptRefused(RuntimeError):
    """POST /prompt answered 400: ``error`` is the server's error object, ``node_errors`` maps node id ->
    {"errors": [{"type", "message", "details", ...}], "class_type": ...}."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.error = body.get("error", {})
        self.node_errors = body.get("node_errors", {})
        lines = [f"{self.error.get('message', 'prompt refused')}: {self.error.get('details', '')}"]
        for node, info in self.node_errors.items():
            for e in info.get("errors", []):
                lines.append(f"  node {node} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__("\n".join(lines))

    def details(self) -> list[str]:
        """Every node error's ``details`` text, in order."""
        return [e.get("details", "") for info in self.node_errors.values() for e in info.get("errors", [])]


class _Listener:
    """A websocket client of ``/ws?clientId=...`` in its own thread, keeping every message it receives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws = None
        self.thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self.thread.start()
        if not self.connected.wait(30) and self.error is None:
            raise TimeoutError(f"websocket {url} did not connect within 30 s")
        if self.error is not None:
            raise RuntimeError(f"websocket {url} failed: {self.error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as e:  # reported to waiters, never raised in this thread
            self.error = e
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            self.connected.set()

    async def _listen(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, heartbeat=None, max_msg_size=0) as ws:
                self._ws = ws
                self.connected.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:  # previews: type and size only
                        event = {"type": "binary", "data": {"bytes": len(msg.data)}}
                    else:
                        break
                    with self.cond:
                        self.events.append(event)
                        self.cond.notify_all()

    def close(self) -> None:
        if self._loop is not None and self._ws is not None and not self.closed:
            try:
                asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(5)
            except Exception:  # the server may already be gone
                pass
        self.thread.join(5)


class ComfyServer:
    """``main.py --cpu`` of a ComfyUI checkout on 127.0.0.1, with a temporary base directory holding
    ``custom_nodes/comfyui-shortft`` (a link to this repository), ``models/{checkpoints,loras,diffusers,
    reward_models}``, ``input/`` and ``output/``; ``pack`` is what is linked (default: this checkout). A context manager; ``stop()`` ends its whole process group and
    removes the base directory unless ``keep_base`` (or ``$SHORTFT_KEEP_COMFY_BASE=1``, to read the log later)."""

    def __init__(self, comfy: Path, startup_timeout: float = 90.0, extra_args: tuple[str, ...] = (),
                 keep_base: bool | None = None, pack: Path = REPO) -> None:
        self.comfy = Path(comfy)
        self.pack = Path(pack)  # the pack linked into custom_nodes: this checkout, or e.g. an unpacked archive
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.keep_base = os.environ.get("SHORTFT_KEEP_COMFY_BASE") == "1" if keep_base is None else keep_base
        self.client_id = uuid.uuid4().hex
        self.base: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.tree_before: dict[str, tuple[int, int]] = {}
        self._listeners: dict[str, _Listener] = {}
        self._log_file = None

    # ----- life cycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def start(self) -> None:
        """Make the base directory, start the server in its own process group and wait until it answers."""
        self.base = Path(tempfile.mkdtemp(prefix="shortft-comfy-"))
        (self.base / "custom_nodes").mkdir()
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(self.pack, target_is_directory=True)
        for sub in MODEL_FOLDERS:
            (self.models / sub).mkdir(parents=True)
        for sub in ("input", "output"):
            (self.base / sub).mkdir()
        self.port = free_port()
        self.tree_before = tree_state(self.comfy)
        # no byte code is written: the checkout may be read-only (or shared), and nothing may be written into it
        # as many CPU threads as the test process uses: two oversubscribed threads can be many times slower
        threads = os.environ.get("SHORTFT_TEST_THREADS", "1")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
               *self.extra_args]
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode} before answering; "
                                   f"log tail:\n{tail}")
            try:
                self.get("/system_stats", timeout=2)
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer /system_stats within {self.startup_timeout:.0f} s; "
                                       f"log tail:\n{tail}")
                time.sleep(0.5)
        log.info("ComfyUI answers at %s (base %s)", self.url, self.base)

    def stop(self) -> None:
        """Close the websockets, end the server's process group (TERM, then KILL after 20 s), wait for it and
        remove the base directory (links in it are removed, never followed)."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base is not None and self.base.is_dir() and not self.keep_base:
            (self.base / "custom_nodes" / PACK_NAME).unlink(missing_ok=True)
            shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.stop)

    # ----- what the server wrote ----------------------------------------------------------------------------------
    def log_text(self) -> str:
        """The server's output so far, colour codes removed."""
        if self.base is None or not self.log_path.is_file():
            return ""
        return _ANSI.sub("", self.log_path.read_text(encoding="utf-8", errors="replace"))

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def tree_changes(self) -> list[str]:
        """Paths under the ComfyUI checkout added, removed or modified since the server started."""
        now = tree_state(self.comfy)
        return sorted(k for k in set(now) | set(self.tree_before) if now.get(k) != self.tree_before.get(k))

    def import_times(self) -> dict[str, bool]:
        """ComfyUI's "Import times for custom nodes" list: custom node path -> imported without failure."""
        text = self.log_text()
        if "Import times for custom nodes:" not in text:
            return {}
        block = text.split("Import times for custom nodes:", 1)[1]
        out = {}
        for line in block.splitlines()[1:]:
            m = re.match(r"(?:\[\w+\] )?\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.+)$", line)
            if not m:
                break
            out[m.group(2).strip()] = m.group(1) is None
        return out

    # ----- HTTP ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str, timeout: float = 60) -> Any:
        """GET ``path`` and decode its JSON answer."""
        return self._request("GET", path, timeout=timeout)

    def object_info(self, node: str | None = None) -> dict[str, Any]:
        return self.get("/object_info" + (f"/{node}" if node else ""))

    def queue(self, prompt: dict[str, Any], client_id: str | None = None) -> str:
        """POST an API-format prompt; returns its prompt id, or raises :class:`PromptRefused` with the node errors."""
        client_id = client_id or self.client_id
        self._listener(client_id)  # listening before the prompt is queued, so no event is missed
        try:
            answer = self._request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            body = e.read()
            if e.code == 400:
                raise PromptRefused(json.loads(body)) from None
            raise RuntimeError(f"POST /prompt answered {e.code}: {body[:2000]!r}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any]:
        """The prompt's history entry (outputs, status), or {} while it has none."""
        return self.get(f"/history/{prompt_id}").get(prompt_id, {})

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    # ----- websocket ----------------------------------------------------------------------------------------------
    def _listener(self, client_id: str) -> _Listener:
        if client_id not in self._listeners:
            self._listeners[client_id] = _Listener(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}")
        return self._listeners[client_id]

    def wait(self, prompt_id: str, timeout: float = 600, client_id: str | None = None) -> list[dict[str, Any]]:
        """Every websocket event of the prompt, from its ``execution_start`` to its ``execution_success``,
        ``execution_error`` or ``execution_interrupted`` (custom events in between included), in order; returns
        once the prompt's history entry is written too (the server stores it just after the last event)."""
        listener = self._listener(client_id or self.client_id)
        deadline = time.monotonic() + timeout

        def span() -> list[dict[str, Any]] | None:
            start = None
            for i, ev in enumerate(listener.events):
                if (ev.get("data") or {}).get("prompt_id") != prompt_id:
                    continue
                start = i if start is None else start
                if ev["type"] in TERMINAL_EVENTS:
                    return listener.events[start:i + 1]
            return None

        with listener.cond:
            while (found := span()) is None:
                if listener.closed:
                    raise RuntimeError(f"websocket closed before prompt {prompt_id} finished "
                                       f"({listener.error!r}); log tail:\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; "
                                       f"log tail:\n{self.log_tail()}")
                listener.cond.wait(min(left, 1.0))
        while not self.history(prompt_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} finished but has no history entry after {timeout:.0f} s")
            time.sleep(0.05)
        return found

    def run(self, prompt: dict[str, Any], timeout: float = 600) -> tuple[str, list[dict[str, Any]]]:
        """Queue ``prompt`` and wait for it: (prompt id, its events)."""
        prompt_id = self.queue(prompt)
        return prompt_id, self.wait(prompt_id, timeout)


def execution_error(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``execution_error`` event's data (node_id, node_type, exception_message, ...), or None."""
    return next((e["data"] for e in events if e["type"] == "execution_error"), None)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the test process dies, so no server outlives a killed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def train_and_sample(loader: str, train: dict[str, Any], reward: str, prompt: str, size: int, batch: int,
                     steps: int) -> dict[str, dict[str, Any]]:
    """The API-format tail every ShortFT graph shares, after a loader node ``loader`` (MODEL, CLIP, VAE as outputs
    0, 1, 2) and a RewardModel ``reward``: LoadShortcutModel "sc" -> ShortFTTrain "train" (``train``: its inputs
    without the model and reward links) -> ApplyAlignedLoRA "apply" on the loader's MODEL -> the stock KSampler
    "sample" (ddim / ddim_uniform, CFG 1) -> VAE Decode "decode" -> ScoreImages "score"."""
    return {
        "sc": {"class_type": "ShortFT_LoadShortcutModel",
               "inputs": {"model": [loader, 0], "clip": [loader, 1], "vae": [loader, 2], "shortcut": "tiny",
                          "preset": "auto"}},
        "train": {"class_type": "ShortFT_Train", "inputs": {"model": ["sc", 0], "reward": [reward, 0], **train}},
        "apply": {"class_type": "ShortFT_ApplyAlignedLoRA", "inputs": {"model": [loader, 0], "lora_set": ["train", 0],
                                                                       "set_name": "none", "strength": 1.0,
                                                                       "mode": "timestep-aware"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": [loader, 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [loader, 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "sample": {"class_type": "KSampler", "inputs": {"model": ["apply", 0], "seed": 0, "steps": steps, "cfg": 1.0,
                                                        "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                                        "positive": ["pos", 0], "negative": ["neg", 0],
                                                        "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": [loader, 2]}},
        "score": {"class_type": "ShortFT_ScoreImages", "inputs": {"images": ["decode", 0], "prompts": prompt,
                                                                  "reward": [reward, 0]}},
    }
