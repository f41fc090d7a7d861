"""Drive a real ComfyUI from tests: a server on a free port, and an in-process runner.

Plain Python (no pytest) so conftest.py and any helper script can use it. See README.md here.

ComfyServer  starts `main.py --cpu` from COMFYUI_DIR under COMFYUI_PYTHON with its own base
             directory (models/, input/, output/, temp/, user/, custom_nodes/<link to the pack>),
             waits until it answers, and offers post_prompt / wait_history / object_info.
run_inprocess runs a scenario function inside a fresh COMFYUI_PYTHON process that imported ComfyUI
             the way main.py does and loaded the pack through ComfyUI's own custom-node loader
             (for tests that need real core objects such as a CLIP, without HTTP).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Deliberately unlike any clone's folder name: the pack must not depend on what its folder is called.
PACK_FOLDER = "zz-slip.under_test"
BASE_SUBDIRS = ("models", "input", "output", "temp", "user", "custom_nodes")


def _clip(line: str, limit: int = 400) -> str:
    return line if len(line) <= limit else line[:limit] + f" ... [{len(line) - limit} more characters]"


class ComfyError(RuntimeError):
    """ComfyUI refused a prompt, failed a run, or died; the message carries its log tail."""


def comfyui_dir() -> Path | None:
    raw = os.environ.get("COMFYUI_DIR", "").strip()
    return Path(raw).resolve() if raw else None


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", "").strip() or sys.executable


def child_env() -> dict[str, str]:
    """The environment for ComfyUI processes: ours minus SLIPSTREAM_* (tests force the standalone host)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPSTREAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def make_base_dir(base: Path) -> Path:
    """A ComfyUI base directory with the pack linked into custom_nodes/ under PACK_FOLDER."""
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        try:
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        except OSError as exc:   # e.g. Windows without symlink rights
            raise ComfyError(f"cannot link the pack into {link}: {exc}") from exc
    return base


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) != 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output_files(entry: dict, base: Path) -> list[Path]:
    """Paths of every {filename, subfolder, type} file named in a /history entry's outputs."""
    found = []
    for node_out in entry.get("outputs", {}).values():
        for values in node_out.values():
            for item in values if isinstance(values, list) else [values]:
                if isinstance(item, dict) and "filename" in item:
                    found.append(base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
    return found


def ui_texts(entry: dict, node_id: str) -> list[str]:
    """The `text` UI values of one output node (e.g. core PreviewAny) in a /history entry."""
    return list(entry.get("outputs", {}).get(node_id, {}).get("text", []))


class ComfyServer:
    """One ComfyUI server process on 127.0.0.1:<free port>, rooted in `base`."""

    def __init__(self, comfy_dir: Path, base: Path, python: str | None = None, extra_args: Iterable[str] = ()):
        self.comfy_dir = Path(comfy_dir)
        self.base = make_base_dir(Path(base))
        self.python = python or comfyui_python()
        self.extra_args = list(extra_args)
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path = self.base / "comfyui.log"
        self.client_id = uuid.uuid4().hex

    # ------------------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 240.0) -> ComfyServer:
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyError(f"COMFYUI_DIR={self.comfy_dir} has no main.py: point it at a ComfyUI checkout")
        self.port = free_port()
        if not port_is_free(self.port):     # a second server on a busy port dies only after loading (~10 s)
            raise ComfyError(f"port {self.port} is already in use")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        log = open(self.log_path, "wb")   # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                        env=child_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.process.returncode} while starting.\n"
                                 f"Command: {' '.join(cmd)}\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s.\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)      # the session we started, nothing else
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "---- ComfyUI log (tail) ----\n" + "\n".join(_clip(line) for line in tail)

    # ------------------------------------------------------------ HTTP

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def object_info(self, node_id: str | None = None) -> dict:
        """GET /object_info (or the entry of one node)."""
        info = self.get("/object_info", timeout=120)
        return info if node_id is None else info[node_id]

    def post_prompt(self, api: dict) -> str:
        """POST an API-format graph; returns the prompt_id or raises with ComfyUI's validation errors."""
        status, body = self.post("/prompt", {"prompt": api, "client_id": self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise ComfyError(f"/prompt refused the graph (HTTP {status}):\n{json.dumps(body, indent=2)}")
        if body.get("node_errors"):
            raise ComfyError(f"/prompt reported node errors:\n{json.dumps(body['node_errors'], indent=2)}")
        return body["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history/<id> until the prompt finished; returns its entry (status, outputs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:                       # ComfyUI writes the history entry when the prompt ends
                return entry
            if self.process is None or self.process.poll() is not None:
                raise ComfyError(f"ComfyUI died while running prompt {prompt_id}.\n{self.log_tail()}")
            time.sleep(0.25)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")

    def run(self, api: dict, timeout: float = 300) -> dict:
        """post_prompt + wait_history, raising with the execution error when the run failed."""
        entry = self.wait_history(self.post_prompt(api), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            detail = json.dumps(errors[-1][1], indent=2)[:6000] if errors else json.dumps(status)[:4000]
            raise ComfyError(f"prompt failed: {detail}\n{self.log_tail(30)}")
        return entry


# ---------------------------------------------------------------- in-process runs


INPROCESS_MARKER = "@@SLIPSTREAM-INPROCESS-RESULT@@"


def run_inprocess(comfy_dir: Path, base: Path, scenario: Path, function: str, python: str | None = None,
                  timeout: float = 600, params: dict | None = None) -> dict:
    """Run `scenario:function(ctx)` in a new COMFYUI_PYTHON process with ComfyUI imported in-process.

    The function receives a context (see inprocess_boot.py) and returns a JSON-serialisable dict.
    """
    base = make_base_dir(Path(base))
    cmd = [python or comfyui_python(), str(HERE / "inprocess_boot.py"), str(comfy_dir), str(base),
           str(base / "custom_nodes" / PACK_FOLDER), str(scenario), function, json.dumps(params or {})]
    proc = subprocess.run(cmd, cwd=comfy_dir, env=child_env(), capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(INPROCESS_MARKER):
            return json.loads(line[len(INPROCESS_MARKER):])
    tail = "\n".join(_clip(line) for line in (proc.stdout + "\n" + proc.stderr).splitlines()[-60:])
    raise ComfyError(f"in-process scenario {scenario.name}:{function} failed (exit {proc.returncode}):\n{tail}")
