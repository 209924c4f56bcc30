"""The one GPU check (``benchmarks/gpu_check.py``) cannot rot: its ``--tiny`` dry run on the CPU, every case.

With a ComfyUI host (the tests' discovery) every case runs through the same worker a GPU run uses, with the
host's Python and ``--cpu`` (dynamic VRAM cannot start on a CPU, so this checks the script, not the GPU path;
``tests/host/test_host_dynamic_vram.py`` covers that path's loaders). Without a host the assets and the table are
still made and every case says why it did not run.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "host"))
from comfy_host import find_host, host_python  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from gpu_check import CASES  # noqa: E402


def test_gpu_check_tiny_dry_run(tmp_path):
    host = find_host()
    py = host_python(host) if host else sys.executable
    out = tmp_path / "gpu_check.json"
    cmd = [py, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--tiny", "--steps", "2", "--work", str(tmp_path),
           "--json", str(out)] + (["--comfy", str(host)] if host else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["case"]: row for row in json.load(open(out))["rows"]}
    assert list(rows) == [c[0] for c in CASES]  # every case reported, in the order
    assert "| case | flags | dynamic VRAM |" in r.stdout
    if host is None:
        assert all("no ComfyUI host" in row["not_reached"] for row in rows.values())
        return
    for name, row in rows.items():
        assert "error" not in row and "not_reached" not in row, (name, row)
        assert row["dynamic_vram"] is False  # --cpu
    for name in ("default_bf16", "disable_dynamic_vram", "lora"):
        # same file, same CPU float32 compute: our MODEL and native's agree (bit for bit on 0.33 today)
        assert rows[name]["rel_diff"] <= 1e-5, (name, rows[name])
        assert rows[name]["ratio"] > 0
    assert rows["fp8_e4m3fn_fast"]["rel_diff"] <= 2e-2  # fp8 storage on both sides
    assert rows["gguf_q8_0"]["rel_diff"] <= 2e-2  # Q8_0 of the same weights against our bf16 MODEL
    assert rows["text_encoder"]["ours_generate_tok_s"] > 0
