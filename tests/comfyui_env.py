"""A real, headless ComfyUI for the node-pack tests (and for scripts/make_comfyui_workflows.py).

The ComfyUI tree is prepared by ``scripts/setup_comfyui.py`` (CI runs it); this module finds
it, lays out a base directory (the repository linked into ``custom_nodes/comfy-nearid``,
models, input images) and starts ``main.py --cpu`` on a free loopback port. When the tree is
missing it raises :class:`ComfyUINotReady`, whose message says to run the setup script.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from _processes import free_port, port_was_taken

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfy-nearid"
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_comfyui.py"


class ComfyUINotReady(RuntimeError):
    """The ComfyUI tree (or the test checkpoint) is missing."""


class _PortTaken(RuntimeError):
    """The server exited at start-up because its port was bound by another process."""


class PromptRejected(RuntimeError):
    """POST /prompt answered with a validation error; ``.body`` holds ComfyUI's JSON."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        super().__init__(json.dumps(body)[:2000])


def setup_module() -> ModuleType:
    """``scripts/setup_comfyui.py`` as a module (one source of truth for the locations)."""
    name = "nearid_setup_comfyui"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SETUP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def require_comfyui() -> Path:
    """The prepared ComfyUI tree, or :class:`ComfyUINotReady` saying how to prepare it."""
    setup = setup_module()
    tree = setup.comfyui_dir()
    problems = setup.check(tree, with_sd15=False)
    if problems:
        raise ComfyUINotReady(
            "ComfyUI is not prepared for the node-pack tests: " + "; ".join(problems)
            + ". Run `python scripts/setup_comfyui.py` (CI's .ci/run does)."
        )
    return tree


def require_sd15_checkpoint() -> Path:
    setup = setup_module()
    path = setup.sd15_checkpoint_path()
    if not setup.sd15_ready(path):
        raise ComfyUINotReady(
            f"the random SD1.5 test checkpoint {path} is missing. Run `python scripts/setup_comfyui.py` "
            "(CI's .ci/run does; it builds the file in about 30 s)."
        )
    return path


def link_sd15_checkpoint(base: Path, name: str | None = None) -> str:
    """Link the random SD1.5 test checkpoint into ``base/models/checkpoints`` (as ``name``, by
    default its own file name) and return the name ``CheckpointLoaderSimple`` lists it under."""
    checkpoint = require_sd15_checkpoint()
    link = base / "models" / "checkpoints" / (name or checkpoint.name)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(checkpoint)
    return link.name


# Widget values that make a generation template run on a CPU in seconds: 64x64 px, 2 steps, and
# cfg 1, at which ComfyUI skips the negative pass (half the time). By node type; the browser
# scripts set the same values on the page's widgets.
QUICK_GENERATION = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2, "cfg": 1.0}}


def quick_generation(prompt: dict[str, Any], ckpt_name: str, batch_size: int) -> dict[str, Any]:
    """A copy of an API-format generation ``prompt`` that loads ``ckpt_name`` and samples
    ``batch_size`` images with :data:`QUICK_GENERATION`'s settings."""
    out = json.loads(json.dumps(prompt))
    kinds = {node["class_type"] for node in out.values()}
    missing = {"CheckpointLoaderSimple", *QUICK_GENERATION} - kinds
    if missing:
        raise ValueError(f"not a generation prompt: it has no {sorted(missing)} node")
    for node in out.values():
        inputs = node["inputs"]
        inputs.update(QUICK_GENERATION.get(node["class_type"], {}))
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        elif node["class_type"] == "EmptyLatentImage":
            inputs["batch_size"] = batch_size
    return out


def prepare_base_dir(base: Path) -> Path:
    """Lay out a ComfyUI base directory with this repository linked in as a custom node."""
    for sub in ("custom_nodes", "models/nearid", "models/checkpoints", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return base


class ComfyServer:
    """One headless ComfyUI process on 127.0.0.1 with its own base directory."""

    def __init__(self, tree: Path, base: Path, port: int | None = None,
                 env: dict[str, str | None] | None = None) -> None:
        """``env``: variables to set for the server process (None removes one), applied after
        the defaults below (offline hub, no NEARID_ALLOW_DOWNLOAD)."""
        self.tree = tree
        self.env = dict(env or {})
        self.base = prepare_base_dir(base)
        self.fixed_port = port is not None  # a port the caller chose is never swapped for another
        self.port = port or free_port()
        self.log_path = self.base / "comfyui.log"
        # the nodes' shared embedding cache (use_cache): inside the base folder, never the user's
        self.embedding_cache = self.base / "user" / "nearid-embeddings.sqlite"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        return [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--disable-api-nodes", "--disable-auto-launch",
            "--database-url", "sqlite:///:memory:",
        ]

    def start(self, timeout: float = 600.0, port_attempts: int = 5) -> "ComfyServer":
        """Start the server and wait until it answers. :func:`free_port` cannot reserve its port,
        so when another process binds it first the server exits at start-up; it is then
        started again on a new free port (up to ``port_attempts`` times)."""
        for attempt in range(1, port_attempts + 1):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if self.fixed_port or attempt == port_attempts:
                    raise RuntimeError(
                        f"ComfyUI could not bind port {self.port} (attempt {attempt}):\n{self.log_tail()}"
                    ) from None
                taken, self.port = self.port, free_port()
                logging.getLogger(__name__).warning(
                    "port %d was taken before ComfyUI bound it; retrying on %d (log from byte %d)",
                    taken, self.port, log_start,
                )
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "ComfyServer":
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
        env.pop("NEARID_ALLOW_DOWNLOAD", None)
        env["NEARID_EMBEDDING_CACHE"] = str(self.embedding_cache)
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), cwd=self.tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if port_was_taken(self.log_path.read_bytes()[log_start:].decode(errors="replace")):
                    raise _PortTaken(self.port)
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during start-up:\n{self.log_tail()}")
            try:
                if self._request("GET", "/object_info/KSampler", timeout=5).status_code == 200:
                    if self._answering_server_is_ours():
                        return self
                    self.stop()  # another ComfyUI holds the port; ours would fail to bind it
                    raise _PortTaken(self.port)
            except OSError:
                pass
            time.sleep(0.5)  # polling for readiness; the deadline only bounds a hung start-up
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def _answering_server_is_ours(self) -> bool:
        """Whether the server on our port was started with our base directory (a parallel
        test run's ComfyUI may hold the port while ours is still loading)."""
        argv = self.get_json("/system_stats").get("system", {}).get("argv", [])
        return str(self.base) in argv

    def running(self) -> bool:
        """The server process has not exited."""
        return self.process is not None and self.process.poll() is None

    def alive(self) -> bool:
        """Running and answering HTTP (a busy machine may take a while: generous timeout)."""
        if not self.running():
            return False
        try:
            return self._request("GET", "/queue", timeout=60).status_code == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, timeout: float = 120.0, **kwargs: Any):
        import requests

        try:
            return requests.request(method, self.url + path, timeout=timeout, **kwargs)
        except requests.RequestException as e:
            raise OSError(f"{method} {path}: {e}") from e

    def get_json(self, path: str) -> Any:
        response = self._request("GET", path)
        response.raise_for_status()
        return response.json()

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, json=body)

    def queue_prompt(self, prompt: dict[str, Any]) -> str:
        response = self.post_json("/prompt", {"prompt": prompt, "client_id": "nearid-tests"})
        body = response.json()
        if response.status_code != 200:
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """The /history entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            if not self.running():  # the process exited (a slow HTTP answer is not a death)
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        return self.wait_for(self.queue_prompt(prompt), timeout)

    def run_quick_generation(self, prompt: dict[str, Any], batch_size: int, timeout: float = 600.0) -> dict[str, Any]:
        """Run an API-format generation ``prompt`` on the random SD1.5 test checkpoint (linked
        into this server's models) with :data:`QUICK_GENERATION`'s settings; the /history entry."""
        return self.run(quick_generation(prompt, link_sd15_checkpoint(self.base), batch_size), timeout)

    def forget_outputs(self) -> None:
        """Drop the server's cache of node outputs, so that the next prompt runs every node (and
        each one reports its text): ``POST /free`` sets a flag that the prompt worker acts on
        after its next prompt, so one small prompt runs next, and the cache is empty after it."""
        response = self.post_json("/free", {"free_memory": True})
        if response.status_code != 200:
            raise RuntimeError(f"POST /free answered {response.status_code}: {response.text[:500]}")
        entry = self.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
        if history_error(entry) is not None:
            raise RuntimeError(f"the prompt after POST /free failed: {history_error(entry)}")

    def wait_until_running(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get_json("/queue").get("queue_running"):
                return
            time.sleep(0.05)
        raise TimeoutError("no prompt started running")

    def image_path(self, record: dict[str, str]) -> Path:
        """File of an image listed in a /history output (``{"filename", "subfolder", "type"}``)."""
        return self.base / record["type"] / record.get("subfolder", "") / record["filename"]


def history_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message of a failed prompt, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def history_message_kinds(entry: dict[str, Any]) -> list[str]:
    return [kind for kind, _ in entry.get("status", {}).get("messages", [])]


# ---------------------------------------------------------------------- workflow formats
LINK_TYPES_ARE_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only nodes, never sent to the server


def _is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in LINK_TYPES_ARE_WIDGETS


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """Convert a UI-format (LiteGraph) workflow to API format, the way ComfyUI's frontend
    does for the plain nodes used here: linked inputs become ``[node_id, slot]``; widget
    values are matched to the node's widget inputs in declaration order (required, then
    optional), skipping the extra ``control_after_generate`` value after seed-like inputs."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in VIRTUAL_NODES:
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        linked = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                linked[slot["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []))
        pos = 0
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if name in linked:
                    inputs[name] = linked[name]
                    continue
                if not _is_widget(spec):
                    continue
                if pos >= len(values):
                    break
                inputs[name] = values[pos]
                pos += 1
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if options.get("control_after_generate"):
                    pos += 1
                if options.get("image_upload"):
                    pos += 1
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
