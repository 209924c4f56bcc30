"""Host-tier fixtures: a real ComfyUI per session (see comfy_host.py for discovery and the API).

``host``      the main host (ComfyUI 0.33 with native Krea 2 here), started once per session.
``host_old``  the old host (ComfyUI 0.3.64, no native Krea 2), started once per session.
``any_host``  parametrized over both: a test using it runs once per host ([host], [host_old]).
``chromium``  a headless Chromium driven by Playwright (browser tier, test_browser.py); skips with one
              reason when Playwright or a system Chromium is missing.

With no host the tests skip with one reason, and the run ends with one line saying whether the
host tier ran, and on what.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_api import HostError  # noqa: E402
from comfy_host import (ComfyHost, find_host, find_old_host, host_python,  # noqa: E402
                        host_version)

# What happened to each host this session: None (not asked for), a ComfyHost, or a skip reason.
_STATE = {"host": None, "host_old": None}


def _skip_reason(which):
    if which == "host":
        env = os.environ.get("COMFYUI_PATH")
        if env:
            return f"host tier skipped: no ComfyUI at COMFYUI_PATH={env}"
        return "host tier skipped: no ComfyUI found (set COMFYUI_PATH)"
    env = os.environ.get("COMFYUI_PATH_OLD")
    if env:
        return f"old-host tests skipped: no ComfyUI at COMFYUI_PATH_OLD={env}"
    if os.environ.get("COMFYUI_PATH") and find_host() is None:
        return f"host tier skipped: no ComfyUI at COMFYUI_PATH={os.environ['COMFYUI_PATH']}"
    return "old-host tests skipped: no ComfyUI 0.3.64 found (set COMFYUI_PATH_OLD)"


def _extra_args(path):
    # Partner/API nodes call remote services and are no part of Krea 2; leaving them out halves the
    # start (0.33 here: 19.6 s -> 10.5 s). KREA2_HOST_API_NODES=1 keeps them.
    if os.environ.get("KREA2_HOST_API_NODES") == "1":
        return []
    cli = os.path.join(str(path), "comfy", "cli_args.py")
    try:
        return ["--disable-api-nodes"] if '"--disable-api-nodes"' in open(cli).read() else []
    except OSError:
        return []


def _start(which, finder):
    state = _STATE[which]
    if isinstance(state, str):
        pytest.skip(state)
    if isinstance(state, ComfyHost):
        return state
    path = finder()
    if path is None:
        _STATE[which] = _skip_reason(which)
        pytest.skip(_STATE[which])
    h = ComfyHost(path, extra_args=_extra_args(path))
    try:
        h.start()
    except HostError:
        _STATE[which] = f"FAILED to start {h.describe()}; log: {h.log_path}"
        h.stop()  # keep the base dir: it holds the log
        raise
    _STATE[which] = h
    return h


@pytest.fixture(scope="session")
def host():
    h = _start("host", find_host)
    yield h
    h.close()


@pytest.fixture(scope="session")
def host_old():
    h = _start("host_old", find_old_host)
    yield h
    h.close()


@pytest.fixture(params=["host", "host_old"])
def any_host(request):
    """Each host in turn (test ids end in [host] / [host_old]); skips the missing one."""
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- browser tier
# Playwright's own browser download is not used: a system Chromium (Debian's ``chromium``) is.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome",
                       "/snap/bin/chromium")
_BROWSER = {"state": None}  # None (not asked for), a description string once launched, or a skip reason


def find_chromium():
    env = os.environ.get("KREA2_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    for c in CHROMIUM_CANDIDATES:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def skip_without_browser():
    """Skip (one reason, kept for the summary) when Playwright or a system Chromium is missing.
    Cheap: tests call it before starting a host."""
    if isinstance(_BROWSER["state"], str) and _BROWSER["state"].startswith("browser tier skipped"):
        pytest.skip(_BROWSER["state"])
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _BROWSER["state"] = "browser tier skipped: Playwright is not installed (pip install playwright)"
        pytest.skip(_BROWSER["state"])
    if find_chromium() is None:
        where = os.environ.get("KREA2_CHROMIUM") or "/usr/bin/chromium"
        _BROWSER["state"] = f"browser tier skipped: no Chromium at {where} (apt-get install chromium)"
        pytest.skip(_BROWSER["state"])


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium (Playwright ``Browser``); skips the browser tier with one reason when absent."""
    skip_without_browser()
    from playwright.sync_api import sync_playwright
    exe = find_chromium()
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
    except Exception:
        pw.stop()
        raise
    _BROWSER["state"] = f"ran in {exe} {browser.version}"
    yield browser
    browser.close()
    pw.stop()


def pytest_report_header(config):
    main, old = find_host(), find_old_host()
    parts = []
    for label, p in (("host", main), ("old host", old)):
        parts.append(f"{label}: ComfyUI {host_version(p)} at {p} ({host_python(p)})" if p else f"{label}: none")
    return "host tier: " + "; ".join(parts)


def _describe(label, state):
    if isinstance(state, ComfyHost):
        log = state.saved_log or state.log_path
        return f"ran on {label} {state.describe()}, ready in {state.startup_seconds:.1f} s, log {log}"
    if isinstance(state, str):
        return state
    return None


def pytest_terminal_summary(terminalreporter):
    described = []
    for d in (_describe("host", _STATE["host"]), _describe("old host", _STATE["host_old"])):
        d = d and d.replace("host tier skipped: ", "skipped: ")
        if d and d not in described:
            described.append(d)
    if not described:
        line = "host tier: not run (no host test selected)"
    else:
        line = "host tier: " + " | ".join(described)
    terminalreporter.write_line(line)
    if _BROWSER["state"]:
        terminalreporter.write_line("browser tier: " + _BROWSER["state"].replace("browser tier skipped: ", "skipped: "))
