"""A real ComfyUI, started headless on the CPU as a subprocess: the host-tier tests' and the demo's (scripts/demo.py).

No mocks of ``comfy``: the host runs with its own Python (never imported into the test process),
the pack is linked into a temporary base directory's ``custom_nodes``, and tests talk to it over
loopback HTTP only (stdlib ``urllib``, no ``requests`` needed in the test venv).

Discovery (docs/architecture.md, "Tests"):
  host          ``COMFYUI_PATH``; else the pack's grandparent when the pack sits in
                ``<ComfyUI>/custom_nodes``; else ``~/comfy/ComfyUI`` (comfy-cli's default).
  old host      ``COMFYUI_PATH_OLD``; else ``~/comfy/ComfyUI-0.3.64`` if present (a host without
                native Krea 2). An explicit ``COMFYUI_PATH`` that does not exist switches the whole
                tier off, the old host included, unless ``COMFYUI_PATH_OLD`` is given too.
  host python   ``COMFYUI_PYTHON``; else a venv inside or beside the host folder
                (``.venv``, ``venv``); else the current interpreter.

The host's own folders are never written to by the harness: ``--base-directory`` (plus explicit
``--output/--input/--temp/--user-directory``) points ComfyUI at a temporary tree, and where the host
knows ``--database-url`` the database is in memory (it would otherwise live in ``<host>/user``).

Typical use (see conftest.py for the session fixtures ``host`` and ``host_old``)::

    with ComfyHost(find_host()) as h:
        h.model_path("diffusion_models", "tiny.safetensors")   # where to write a test asset
        hist = h.run({"1": {"class_type": "EmptyLatentImage", ...}, ...}, timeout=300)
        files = h.outputs(hist, kind="latents")
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .host_api import HostAPI, HostError

PACK_ROOT = Path(__file__).resolve().parents[2]
# Folder name the pack gets inside the temporary custom_nodes (ComfyUI's module name for it).
PACK_DIRNAME = "krea2_nodes"
OLD_HOST_DEFAULT = Path("~/comfy/ComfyUI-0.3.64").expanduser()
HOST_DEFAULT = Path("~/comfy/ComfyUI").expanduser()
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "loras", "vae", "checkpoints", "clip",
                 "unet", "latent_upscale_models")


# ---------------------------------------------------------------- discovery


def is_comfy_dir(path) -> bool:
    p = Path(path)
    return (p / "main.py").is_file() and (p / "comfy").is_dir() and (p / "nodes.py").is_file()


def find_host() -> Path | None:
    """The main host folder, or None. See the module docstring for the order."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser()
        return p.resolve() if is_comfy_dir(p) else None
    # The pack under <ComfyUI>/custom_nodes/<pack>: take the grandparent. Checked on the path as
    # given (a symlinked checkout counts) and on the resolved path.
    for root in (Path(__file__).absolute().parents[2], PACK_ROOT):
        if root.parent.name == "custom_nodes" and is_comfy_dir(root.parent.parent):
            return root.parent.parent
    return HOST_DEFAULT if is_comfy_dir(HOST_DEFAULT) else None


def find_old_host() -> Path | None:
    """A second host for old-version runs (no native Krea 2), or None."""
    env = os.environ.get("COMFYUI_PATH_OLD")
    if env:
        p = Path(env).expanduser()
        return p.resolve() if is_comfy_dir(p) else None
    main_env = os.environ.get("COMFYUI_PATH")
    if main_env and not is_comfy_dir(Path(main_env).expanduser()):
        return None  # the run asked for a host that is not there: the whole tier is off
    return OLD_HOST_DEFAULT if is_comfy_dir(OLD_HOST_DEFAULT) else None


def _venv_python(venv: Path) -> Path | None:
    for rel in ("bin/python", "bin/python3", "Scripts/python.exe"):
        if (venv / rel).is_file():
            return venv / rel
    return None


def host_python(comfy_dir) -> str:
    """The interpreter that runs the host: COMFYUI_PYTHON, else a venv inside or beside it."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    comfy_dir = Path(comfy_dir)
    for base in (comfy_dir, comfy_dir.parent):
        for name in (".venv", "venv"):
            py = _venv_python(base / name)
            if py is not None:
                return str(py)
    return sys.executable


def host_version(comfy_dir) -> str:
    """ComfyUI's version string from comfyui_version.py (or pyproject.toml), else 'unknown'."""
    comfy_dir = Path(comfy_dir)
    for name in ("comfyui_version.py", "pyproject.toml"):
        f = comfy_dir / name
        if f.is_file():
            m = re.search(r'^\s*(?:__version__|version)\s*=\s*"([^"]+)"', f.read_text(), re.M)
            if m:
                return m.group(1)
    return "unknown"


def version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def has_native_krea2(comfy_dir) -> bool:
    return (Path(comfy_dir) / "comfy" / "ldm" / "krea2" / "model.py").is_file()


# ---------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the host


class ComfyHost(HostAPI):
    """One ComfyUI server process with the pack installed in a throwaway base directory: its folder tree,
    command line, start / stop and log here; talking to it over HTTP in :class:`host_api.HostAPI`.

    Attributes after ``start()``: ``url``, ``port``, ``version``, ``python``, ``base_dir``,
    ``models_dir``, ``output_dir``, ``input_dir``, ``temp_dir``, ``user_dir``, ``log_path``,
    ``startup_seconds``, ``args`` (the command line).
    """

    def __init__(self, comfy_dir, python: str | None = None, *, base_dir=None,
                 startup_timeout: float = 300.0, extra_args=(), env=None, keep_base_dir=False):
        self.comfy_dir = Path(comfy_dir).resolve()
        if not is_comfy_dir(self.comfy_dir):
            raise HostError(f"not a ComfyUI folder: {self.comfy_dir}")
        self.python = python or host_python(self.comfy_dir)
        self.version = host_version(self.comfy_dir)
        self.native_krea2 = has_native_krea2(self.comfy_dir)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self._own_base = base_dir is None
        self.keep_base_dir = keep_base_dir
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="krea2-host-"))
        self.models_dir = self.base_dir / "models"
        self.output_dir = self.base_dir / "output"
        self.input_dir = self.base_dir / "input"
        self.temp_dir = self.base_dir / "temp"
        self.user_dir = self.base_dir / "user"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        self.log_path = self.base_dir / "server.log"
        self.proc = None
        self.port = None
        self.url = None
        self.startup_seconds = None
        self.args = None
        self._log_file = None
        self.saved_log = None
        self.client_id = uuid.uuid4().hex
        self._make_tree()

    # -- layout

    def _make_tree(self):
        for d in (self.output_dir, self.input_dir, self.temp_dir, self.user_dir, self.custom_nodes_dir):
            d.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes_dir / PACK_DIRNAME
        if not link.exists():
            try:
                link.symlink_to(PACK_ROOT, target_is_directory=True)
            except OSError:  # no symlinks (some Windows setups): copy the code, not the tests' junk
                shutil.copytree(PACK_ROOT, link, ignore=shutil.ignore_patterns(
                    ".git", "__pycache__", ".venv", "venv", "*.safetensors"))

    def model_path(self, folder: str, name: str) -> Path:
        """Path for a test asset in ``models/<folder>/<name>`` (folders made on demand)."""
        p = self.models_dir / folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _supported_flags(self) -> set:
        src = ""
        for f in (self.comfy_dir / "comfy" / "cli_args.py",):
            if f.is_file():
                src = f.read_text(errors="replace")
        return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', src))

    def command(self, port: int) -> list:
        flags = self._supported_flags()
        args = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                "--disable-auto-launch"]
        for flag, path in (("--base-directory", self.base_dir), ("--output-directory", self.output_dir),
                           ("--input-directory", self.input_dir), ("--temp-directory", self.temp_dir),
                           ("--user-directory", self.user_dir)):
            if flag in flags:
                args += [flag, str(path)]
        if "--base-directory" not in flags:
            # Very old hosts: models through an extra paths file. custom_nodes would then be the
            # host's own, which this harness never modifies, so refuse instead.
            raise HostError(f"ComfyUI {self.version} has no --base-directory; the harness needs it")
        if "--database-url" in flags:
            args += ["--database-url", "sqlite:///:memory:"]  # default lives in <host>/user
        return args + self.extra_args

    # -- process

    def start(self):
        if self.proc is not None:
            return self
        env = dict(os.environ)
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(k, None)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1"})
        env.update(self.extra_env)
        last = None
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.args = self.command(self.port)
            self._log_file = open(self.log_path, "ab")
            self._log_file.write(f"$ {' '.join(self.args)}\n".encode())
            self._log_file.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.args, cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=self._log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            try:
                self._wait_ready(t0)
                self.startup_seconds = time.monotonic() - t0
                return self
            except HostError as e:
                last = e
                in_use = "address already in use" in self.log_text()[-4000:].lower()
                self.stop()
                if not in_use:
                    break
        raise last

    def _wait_ready(self, t0):
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI {self.version} exited with {self.proc.returncode} during start"
                                f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(0.5)
        raise HostError(f"ComfyUI {self.version} not ready after {self.startup_timeout:.0f} s"
                        f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}")

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its children
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=20)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def close(self):
        """Stop the server, keep a copy of its log (``saved_log``), and remove the temporary base
        directory (unless ``keep_base_dir`` or env ``KREA2_KEEP_HOST=1``, or the dir was given)."""
        self.stop()
        try:
            logs = Path(tempfile.gettempdir()) / "krea2-host-logs"
            logs.mkdir(exist_ok=True)
            self.saved_log = logs / f"ComfyUI-{self.version}-{os.getpid()}.log"
            shutil.copyfile(self.log_path, self.saved_log)
        except OSError:
            self.saved_log = None
        keep = self.keep_base_dir or os.environ.get("KREA2_KEEP_HOST") == "1"
        if self._own_base and not keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- log

    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pack_import_errors(self) -> list:
        """Log lines where ComfyUI reports that loading this pack failed (empty list: none)."""
        text = self.log_text()
        out = []
        markers = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint",
                   "did not return a ComfyExtension", "did not return a list of nodes",
                   "Skip ", "not callable")
        for line in text.splitlines():
            if PACK_DIRNAME in line and any(m in line for m in markers):
                out.append(line.strip())
        if out:  # add the traceback ComfyUI logged just before the first failure line
            lines = text.splitlines()
            first = next(i for i, l in enumerate(lines) if l.strip() == out[0])
            start = next((i for i in range(first - 1, max(first - 80, -1), -1)
                          if "Traceback (most recent call last)" in lines[i]), None)
            if start is not None:
                out.append("\n".join(lines[start:first]))
        return out

    def pack_import_ok(self) -> bool:
        """True when the import-times table lists the pack without IMPORT FAILED."""
        pat = re.compile(r"[\d.]+ seconds: .*custom_nodes[\\/]" + re.escape(PACK_DIRNAME) + r"\s*$", re.M)
        return bool(pat.search(self.log_text())) and not self.pack_import_errors()

    def describe(self) -> str:
        return (f"ComfyUI {self.version} at {self.comfy_dir} (python {self.python}"
                f"{', native Krea 2' if self.native_krea2 else ''})")
