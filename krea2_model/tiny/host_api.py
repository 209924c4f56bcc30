"""Talking to a running ComfyUI over loopback HTTP (stdlib ``urllib`` only): queue API-format workflows,
wait for them, read their outputs, and turn the server's refusals into typed errors.

:class:`HostAPI` is the HTTP half of :class:`~.comfy_server.ComfyHost`; it needs from the host object ``url``,
``client_id``, ``alive()``, ``log_tail()`` and the ``output_dir`` / ``temp_dir`` / ``input_dir`` folders.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request


class HostError(RuntimeError):
    """The host did not start, died, or did not answer in time (message carries the log tail)."""


class PromptError(RuntimeError):
    """/prompt refused the workflow (validation). ``node_errors`` is ComfyUI's dict."""

    def __init__(self, message, error=None, node_errors=None):
        super().__init__(message)
        self.error = error or {}
        self.node_errors = node_errors or {}


class ExecutionError(RuntimeError):
    """The prompt ran and failed. ``messages`` are ComfyUI's history status messages."""

    def __init__(self, message, history=None, messages=None):
        super().__init__(message)
        self.history = history or {}
        self.messages = messages or []


def _format_node_errors(error, node_errors) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('type', '')}: {error.get('message', '')} {error.get('details', '')}".strip())
    for nid, ne in (node_errors or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"node {nid} ({ne.get('class_type', '?')}): {e.get('message', '')}"
                         f" {e.get('details', '')}".rstrip())
    return "\n".join(lines) or "unknown /prompt error"



class HostAPI:
    """The server's HTTP API, as the tests use it."""

    def _request(self, method, path, payload=None, timeout=60.0):
        if not self.alive():
            raise HostError(f"ComfyUI is not running\n--- log tail ---\n{self.log_tail()}")
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def get(self, path, timeout=60.0):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise HostError(f"GET {path} -> {status}: {body}")
        return body

    def post(self, path, payload, timeout=60.0):
        return self._request("POST", path, payload, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """All node definitions, or ``{node_class: def}`` for one ({} when unknown)."""
        if node_class is None:
            return self.get("/object_info", timeout=120)
        status, body = self._request("GET", "/object_info/" + urllib.parse.quote(node_class))
        return body if status == 200 and isinstance(body, dict) else {}

    def post_prompt(self, workflow: dict, *, client_id: str | None = None) -> str:
        """Queue an API-format workflow; return its prompt_id. Raises PromptError on validation errors."""
        status, body = self.post("/prompt", {"prompt": workflow, "client_id": client_id or self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            err = body.get("error") if isinstance(body, dict) else {"message": str(body)}
            ne = body.get("node_errors") if isinstance(body, dict) else {}
            raise PromptError(f"/prompt refused the workflow ({status}):\n{_format_node_errors(err, ne)}",
                              err, ne)
        if body.get("node_errors"):
            raise PromptError("/prompt: " + _format_node_errors(None, body["node_errors"]), None,
                              body["node_errors"])
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        body = self.get("/history/" + urllib.parse.quote(prompt_id))
        return (body or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Wait for a prompt to finish; return its history entry (``outputs``, ``status``, ...).

        Raises ExecutionError with the node type, message and traceback when it failed,
        HostError when the server died or the time ran out (the prompt is then interrupted).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise HostError(f"ComfyUI died while running {prompt_id}\n--- log tail ---\n{self.log_tail()}")
            h = self.history(prompt_id)
            if h is not None:
                st = h.get("status") or {}
                # History is written when the prompt is over; an error or interrupt is "error".
                if st.get("status_str") == "error":
                    raise ExecutionError(self._execution_error_text(prompt_id, st), h, st.get("messages"))
                return h
            time.sleep(poll)
        self.post("/interrupt", {})
        raise HostError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n--- log tail ---\n{self.log_tail()}")

    @staticmethod
    def _execution_error_text(prompt_id, status) -> str:
        lines = [f"prompt {prompt_id} failed"]
        for event, data in status.get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                lines.append(f"{event}: node {data.get('node_id')} ({data.get('node_type')}): "
                             f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
                tb = data.get("traceback")
                if tb:
                    lines.append("".join(tb) if isinstance(tb, list) else str(tb))
        return "\n".join(lines)

    def run(self, workflow: dict, timeout: float = 600.0) -> dict:
        """post_prompt + wait."""
        return self.wait(self.post_prompt(workflow), timeout=timeout)

    def outputs(self, history: dict, kind: str | None = None, node_id: str | None = None) -> list:
        """Files a finished prompt saved: Paths for ``history['outputs'][node][kind]`` entries
        (``kind``: "images", "latents", "audio", ...; None = all kinds), resolved against the
        output/temp/input folders of the base directory."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for nid, out in (history.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for k, items in out.items():
                if kind is not None and k != kind or not isinstance(items, list):
                    continue
                for it in items:
                    if isinstance(it, dict) and "filename" in it:
                        root = roots.get(it.get("type", "output"), self.output_dir)
                        files.append(root / it.get("subfolder", "") / it["filename"])
        return files

    def free(self):
        """Ask the host to unload models and free memory (between heavy tests)."""
        self.post("/free", {"unload_models": True, "free_memory": True})
