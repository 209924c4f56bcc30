"""The example workflows in ComfyUI's own frontend, as a user meets them (browser tier).

A real ComfyUI (the ``host`` fixture) with the pack and the tiny generated assets, opened in a
headless system Chromium driven by Playwright. Each ``example_workflows/*.json`` is dropped onto the
canvas as a file (the frontend's own drop handler loads it, as when a user drags the file in), then:

- no missing-node / missing-model warning (dialog or error overlay), every node type registered,
  every model file name in a combo is one the host lists, and no node drawn over another;
- every node of ours is rendered with its agreed inputs (docs/architecture.md rule 6), category "Krea 2", and a
  fresh node of each type shows the agreed defaults;
- the frontend's own export (``app.graphToPrompt()``) equals the API twin in
  ``example_workflows/api/`` (modulo ``_meta``);
- with the size widgets set to 128 px in the page, the Run (queue) button runs the graph to a finished
  image preview in the SaveImage node;
- a screenshot of the finished graph and the frontend's export go to
  ``test-artifacts/browser/ComfyUI-<version>/`` (``KREA2_TEST_ARTIFACTS`` moves ``test-artifacts``).

A copy with a misspelt node ID must be caught by the same checks (so the checks cannot go blind
when the frontend changes how it warns).
"""

import copy
import glob
import json
import os
import re
import time

import pytest

from comfy_host import PACK_DIRNAME
from conftest import skip_without_browser
from tests.host import assets as A

pytestmark = pytest.mark.browser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
ARTIFACTS = os.path.join(os.environ.get("KREA2_TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts")), "browser")
SIZE = 128  # px the size widgets are set to before queueing (the examples are 1024x1024)
VIEWPORT = {"width": 1600, "height": 900}

# docs/architecture.md rule 6: these inputs are part of every saved workflow (more may follow, never renamed);
# defaults as the README's node table gives them.
AGREED = {
    "Krea2ModelLoader": {"inputs": ["model_name", "weight_dtype"], "defaults": {"weight_dtype": "default"},
                         "options": {"weight_dtype": ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]}},
    "Krea2TextEncoderLoader": {"inputs": ["text_encoder_name"]},
    "Krea2TextEncode": {"inputs": ["clip", "text"],
                        "defaults": {"taps": "2,5,8,11,14,17,20,23,26,29,32,35", "max_tokens": 512}},
    "Krea2ModelSampling": {"inputs": ["model", "variant", "width", "height"],
                           "defaults": {"base_shift": 0.5, "max_shift": 1.15},
                           "options": {"variant": ["raw", "turbo"]}},
    "Krea2LoraLoader": {"inputs": ["model", "lora_name", "strength"], "defaults": {"strength": 1.0}},
    "Krea2ReferenceEncode": {"inputs": ["clip", "text", "vae", "image"],
                             "defaults": {"method": "style / edit (timestep zero)"},
                             "options": {"method": ["style / edit (timestep zero)", "identity edit"]}},
}
MODEL_WIDGETS = {"model_name", "text_encoder_name", "lora_name", "vae_name", "unet_name", "clip_name",
                 "ckpt_name"}

# Frontend settings for a clean first load: no first-run template browser, no minimap over the graph.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}

# ---------------------------------------------------------------- page-side helpers (JavaScript)

JS_NODES = "() => (window.app.graph.nodes || window.app.graph._nodes)"

JS_STATE = """() => {
    const nodes = window.app.graph.nodes || window.app.graph._nodes;
    const reg = window.LiteGraph.registered_node_types;
    return nodes.map(n => ({
        id: String(n.id), type: n.type, registered: n.type in reg,
        category: reg[n.type] ? (reg[n.type].category || (reg[n.type].nodeData || {}).category || null) : null,
        inputs: (n.inputs || []).map(i => i.name),
        widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
            options: w.options && Array.isArray(w.options.values) ? w.options.values : null})),
    }));
}"""

# Pairs of nodes whose drawn areas (title bar included) overlap: one hides the other's widgets.
JS_OVERLAPS = """() => {
    const nodes = window.app.graph.nodes || window.app.graph._nodes;
    const r = nodes.map(n => [String(n.id) + ' (' + (n.title || n.type) + ')', Array.from(n.boundingRect)]);
    const out = [];
    for (let i = 0; i < r.length; i++) for (let j = i + 1; j < r.length; j++) {
        const [a, A] = r[i], [b, B] = r[j];
        if (A[0] < B[0] + B[2] && B[0] < A[0] + A[2] && A[1] < B[1] + B[3] && B[1] < A[1] + A[3])
            out.push(a + ' and ' + b);
    }
    return out;
}"""

JS_FRESH = """(type) => {
    const n = window.LiteGraph.createNode(type);
    return n ? Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])) : null;
}"""

# Anything the frontend shows to warn about the loaded graph: dialogs (older frontends: "Some Nodes
# Are Missing", "missing models"), the newer error overlay, error toasts.
JS_WARNINGS = """() => {
    const sel = '.p-dialog, [role=dialog], [role=alertdialog], [data-testid=error-overlay], ' +
                '.p-toast-message-error, .p-toast-message-warn, .comfy-missing-nodes, .comfy-missing-models';
    const seen = new Set(), out = [];
    for (const el of document.querySelectorAll(sel)) {
        const r = el.getBoundingClientRect(), st = getComputedStyle(el);
        if (r.width === 0 || r.height === 0 || st.visibility === 'hidden' || st.display === 'none') continue;
        const t = (el.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 400);
        if (!seen.has(t)) { seen.add(t); out.push(t || el.className.toString()); }
    }
    return out;
}"""

JS_LISTEN = """() => {
    window.__krea2_ev = [];
    for (const t of ['execution_start', 'executed', 'execution_success', 'execution_error',
                     'execution_interrupted'])
        window.app.api.addEventListener(t, e => window.__krea2_ev.push([t, e.detail]));
}"""

JS_SHRINK = """(size) => {
    const nodes = window.app.graph.nodes || window.app.graph._nodes;
    let changed = 0;
    for (const n of nodes) {
        if (n.type !== 'EmptySD3LatentImage' && n.type !== 'Krea2ModelSampling') continue;
        for (const w of n.widgets || []) {
            if (w.name !== 'width' && w.name !== 'height') continue;
            w.value = size;
            if (w.callback) w.callback(size, window.app.canvas, n);
            changed++;
        }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return changed;
}"""

JS_PREVIEW = """() => {
    const nodes = window.app.graph.nodes || window.app.graph._nodes;
    const save = nodes.filter(n => n.type === 'SaveImage');
    if (!save.length) return null;
    const out = [];
    for (const n of save) {
        const imgs = n.imgs || [];
        if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;
        out.push(imgs.map(i => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight})));
    }
    return out;
}"""


# ---------------------------------------------------------------- fixtures


# The main host only by default (keeps the tier near 2.5 min on two CPU cores); KREA2_BROWSER_OLD=1
# adds the old host (ComfyUI 0.3.64 and its older frontend).
BROWSER_HOSTS = ["host", "host_old"] if os.environ.get("KREA2_BROWSER_OLD") == "1" else ["host"]


@pytest.fixture(scope="session", params=BROWSER_HOSTS)
def bhost(request):
    """A host with the tiny assets (same attributes as test_host_nodes' ``h``) and clean-load settings.
    Skips before starting anything when Playwright or Chromium is missing."""
    skip_without_browser()
    host = request.getfixturevalue(request.param)
    if not getattr(host, "_krea2_assets", None):
        host._krea2_assets = A.make_assets(str(host.models_dir), host.python, str(host.comfy_dir))
        host.root = str(host.comfy_dir)
        host.pack_dir = str(host.custom_nodes_dir / PACK_DIRNAME)
    settings = host.user_dir / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(settings.read_text()) if settings.is_file() else {}
    settings.write_text(json.dumps({**current, **SETTINGS}, indent=2))
    host.free()  # other host tests may have left models loaded
    return host


class Page:
    """One browser tab on the host's frontend, with the page's JavaScript errors kept for reports."""

    def __init__(self, browser, host):
        self.host = host
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page_errors = []
        self.console_errors = []
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        t0 = time.monotonic()
        self.page.goto(host.url, wait_until="domcontentloaded", timeout=120_000)
        self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                                    "window.app.api && document.querySelector('#graph-canvas')",
                                    timeout=120_000)
        self.page.wait_for_timeout(1500)  # the frontend restores the last graph, then settles
        self.load_seconds = time.monotonic() - t0

    def close(self):
        self.context.close()

    def evaluate(self, js, arg=None):
        return self.page.evaluate(js, arg)

    def drop_file(self, name: str, text: str, expect_nodes: int, timeout=60_000):
        """Drop a workflow file onto the canvas, as a user dragging it in from the file manager."""
        dt = self.page.evaluate_handle(
            "([name, text]) => { const dt = new DataTransfer();"
            " dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }", [name, text])
        box = self.page.locator("#graph-canvas").bounding_box()
        pos = {"clientX": box["x"] + box["width"] / 2, "clientY": box["y"] + box["height"] / 2}
        self.page.dispatch_event("#graph-canvas", "dragenter", {"dataTransfer": dt, **pos})
        self.page.dispatch_event("#graph-canvas", "dragover", {"dataTransfer": dt, **pos})
        self.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": dt, **pos})
        self.page.wait_for_function(f"() => ({JS_NODES})().length === {expect_nodes}", timeout=timeout)
        self.page.wait_for_timeout(2000)  # warnings (missing nodes / models) are raised after the load

    def diagnostics(self) -> str:
        parts = []
        if self.page_errors:
            parts.append("page errors:\n  " + "\n  ".join(self.page_errors[-10:]))
        if self.console_errors:
            parts.append("console errors:\n  " + "\n  ".join(self.console_errors[-10:]))
        tail = re.sub(r"\x1b\[[0-9;]*m", "", self.host.log_tail(15))
        parts.append("server log tail:\n" + tail)
        return "\n".join(parts)

    def click_run(self):
        """The frontend's Run / Queue button (new menu's data-testid, else the legacy menu's)."""
        for sel in ("[data-testid=queue-button]", "button.comfyui-queue-button", "#queue-button",
                    "button:has-text('Queue Prompt')", "button:has-text('Queue')", "button:has-text('Run')"):
            loc = self.page.locator(sel + " >> visible=true")
            if loc.count():
                loc.first.click()
                return sel
        raise AssertionError("no visible Run / Queue button in the page")

    def fit_view(self):
        button = self.page.locator("button[aria-label^='Fit View'] >> visible=true")
        if button.count():
            button.first.click()
        else:
            self.page.evaluate("() => document.activeElement && document.activeElement.blur()")
            self.page.keyboard.press(".")  # the frontend's "Fit view" shortcut
        self.page.wait_for_timeout(700)


def problems_after_load(pg: Page, ui: dict) -> list:
    """What a user would be warned about, or would find missing, right after loading ``ui``."""
    problems = [f"frontend warning: {w}" for w in pg.evaluate(JS_WARNINGS)]
    state = pg.evaluate(JS_STATE)
    for n in state:
        if not n["registered"]:
            problems.append(f"node {n['id']}: type {n['type']!r} is not a registered node (missing node)")
        for w in n["widgets"]:
            if w["name"] in MODEL_WIDGETS and w["options"] is not None and w["value"] not in w["options"]:
                problems.append(f"node {n['id']} ({n['type']}): {w['name']} = {w['value']!r} is not among the "
                                f"host's files {w['options']} (missing model)")
    problems += [f"nodes overlap on the canvas: {pair}" for pair in pg.evaluate(JS_OVERLAPS)]
    want = sorted((str(n["id"]), n["type"]) for n in ui["nodes"])
    got = sorted((n["id"], n["type"]) for n in state)
    if want != got:
        problems.append(f"graph nodes {got} differ from the file's {want}")
    return problems


def check_our_nodes(pg: Page) -> list:
    """Each node of ours: registered in category "Krea 2", with the agreed inputs, in order."""
    problems = []
    for n in pg.evaluate(JS_STATE):
        spec = AGREED.get(n["type"])
        if spec is None:
            continue
        where = f"node {n['id']} ({n['type']})"
        if n["category"] != "Krea 2":
            problems.append(f"{where}: category {n['category']!r}, expected 'Krea 2'")
        widgets = [w["name"] for w in n["widgets"]]
        slots = n["inputs"]
        for name in spec["inputs"]:
            if name not in widgets and name not in slots:
                problems.append(f"{where}: agreed input {name!r} not rendered (widgets {widgets}, slots {slots})")
        agreed_widgets = [x for x in spec["inputs"] if x in widgets]
        if widgets[:len(agreed_widgets)] != agreed_widgets:
            problems.append(f"{where}: widgets {widgets} do not start with the agreed {agreed_widgets}")
        for name, opts in spec.get("options", {}).items():
            got = next((w["options"] for w in n["widgets"] if w["name"] == name), None)
            if got != opts:
                problems.append(f"{where}: {name} options {got}, agreed {opts}")
    return problems


def check_defaults(pg: Page) -> list:
    """A fresh node of each of ours (as from the node library) shows the agreed defaults."""
    problems = []
    for cls, spec in AGREED.items():
        fresh = pg.evaluate(JS_FRESH, cls)
        if fresh is None:
            problems.append(f"{cls}: the frontend cannot create it")
            continue
        for name in spec["inputs"]:
            if name not in fresh and name not in ("model", "clip", "vae", "image"):  # link-only inputs
                problems.append(f"{cls}: a new node has no widget {name!r} ({sorted(fresh)})")
        for name, value in spec.get("defaults", {}).items():
            if fresh.get(name) != value:
                problems.append(f"{cls}: {name} defaults to {fresh.get(name)!r}, agreed {value!r}")
    return problems


def strip_meta(api: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in api.items()}


def run_in_page(pg: Page, timeout_s=300) -> dict:
    """Press Run and wait for the prompt's end; return the events and the SaveImage previews."""
    pg.evaluate(JS_LISTEN)
    t0 = time.monotonic()
    button = pg.click_run()
    pg.page.wait_for_function(
        "() => window.__krea2_ev.some(e => ['execution_success', 'execution_error',"
        " 'execution_interrupted'].includes(e[0]))", timeout=timeout_s * 1000)
    events = pg.evaluate("() => window.__krea2_ev")
    end = [e for e in events if e[0] in ("execution_success", "execution_error", "execution_interrupted")][0]
    if end[0] != "execution_success":
        d = end[1] or {}
        raise AssertionError(f"{end[0]} in node {d.get('node_id')} ({d.get('node_type')}): "
                             f"{d.get('exception_type')}: {d.get('exception_message')}\n"
                             + "".join(d.get("traceback") or []) + "\n" + pg.diagnostics())
    pg.page.wait_for_function(f"({JS_PREVIEW})", timeout=60_000)
    return {"button": button, "seconds": time.monotonic() - t0, "events": [e[0] for e in events],
            "executed": [e[1] for e in events if e[0] == "executed"], "previews": pg.evaluate(JS_PREVIEW)}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_example_workflow_in_the_frontend(bhost, chromium, path):
    name = os.path.basename(path)
    stem = name[:-len(".json")]
    text = open(path).read()
    ui = json.loads(text)
    twin = json.load(open(os.path.join(ROOT, "example_workflows", "api", name)))
    out_dir = os.path.join(ARTIFACTS, f"ComfyUI-{bhost.version}")
    os.makedirs(out_dir, exist_ok=True)
    failed_shot = os.path.join(out_dir, f"{stem}.load-failed.png")
    if os.path.exists(failed_shot):
        os.remove(failed_shot)
    pg = Page(chromium, bhost)
    try:
        pg.drop_file(name, text, expect_nodes=len(ui["nodes"]))
        problems = problems_after_load(pg, ui)
        if problems:
            pg.page.screenshot(path=failed_shot)
        assert not problems, f"{name} loaded with problems:\n  " + "\n  ".join(problems) + "\n" + pg.diagnostics()

        problems = check_our_nodes(pg) + check_defaults(pg)
        assert not problems, f"{name}: our nodes are not as agreed:\n  " + "\n  ".join(problems)

        # The frontend's own export of the loaded file equals the API twin (the twins stay in step).
        exported = pg.evaluate("async () => (await window.app.graphToPrompt()).output")
        export_path = os.path.join(out_dir, f"{stem}.frontend_api.json")
        with open(export_path, "w") as f:
            json.dump(exported, f, indent=2)
        assert strip_meta(exported) == strip_meta(twin), (
            f"{name}: the frontend's export ({os.path.relpath(export_path, ROOT)}) differs from "
            f"example_workflows/api/{name}")

        # As a user would: smaller image size in the page, then Run, then wait for the preview.
        assert pg.evaluate(JS_SHRINK, SIZE) == 4
        done = run_in_page(pg)
        saves = [k for k, v in twin.items() if v["class_type"] == "SaveImage"]
        assert "execution_start" in done["events"] and "execution_success" in done["events"]
        assert sorted(str(e.get("node")) for e in done["executed"]) == sorted(saves)
        assert all(img["w"] == SIZE and img["h"] == SIZE for imgs in done["previews"] for img in imgs), done
        for e in done["executed"]:
            for img in e["output"]["images"]:
                assert (bhost.output_dir / img.get("subfolder", "") / img["filename"]).is_file()

        pg.fit_view()
        shot = os.path.join(out_dir, f"{stem}.png")
        pg.page.screenshot(path=shot)
        assert os.path.getsize(shot) > 10_000
        print(f"{name}: page ready in {pg.load_seconds:.1f} s, ran in {done['seconds']:.1f} s "
              f"via {done['button']}, screenshot {os.path.relpath(shot, ROOT)}")
    finally:
        pg.close()


def test_misspelt_node_id_is_caught(bhost, chromium):
    """The load checks above see a workflow whose node ID is misspelt (and the frontend warns)."""
    path = os.path.join(ROOT, "example_workflows", "krea2_turbo_text_to_image.json")
    ui = json.load(open(path))
    bad = copy.deepcopy(ui)
    node = next(n for n in bad["nodes"] if n["type"] == "Krea2ModelSampling")
    node["type"] = "Krea2ModelSamplng"
    pg = Page(chromium, bhost)
    try:
        pg.drop_file("misspelt.json", json.dumps(bad), expect_nodes=len(bad["nodes"]))
        problems = problems_after_load(pg, bad)
    finally:
        pg.close()
    assert any("'Krea2ModelSamplng' is not a registered node" in p for p in problems), problems
    assert any(p.startswith("frontend warning:") and "Krea2ModelSamplng" in p for p in problems), (
        f"the frontend showed no warning naming the misspelt node: {problems}")
