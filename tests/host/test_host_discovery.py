"""Host discovery rules (docs/architecture.md, "Tests"), checked on fake host folders: needs no ComfyUI."""

import sys
from pathlib import Path

import comfy_host as ch


def fake_host(path: Path, version="9.9.9", venv=None) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("")
    (path / "nodes.py").write_text("")
    (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    if venv:
        (path / venv / "bin").mkdir(parents=True)
        (path / venv / "bin" / "python").write_text("")
    return path


def test_comfyui_path_wins(tmp_path, monkeypatch):
    h = fake_host(tmp_path / "X")
    monkeypatch.setenv("COMFYUI_PATH", str(h))
    assert ch.find_host() == h.resolve()
    assert ch.host_version(h) == "9.9.9"


def test_missing_comfyui_path_switches_the_tier_off(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nope"))
    monkeypatch.delenv("COMFYUI_PATH_OLD", raising=False)
    monkeypatch.setattr(ch, "OLD_HOST_DEFAULT", fake_host(tmp_path / "old"))
    assert ch.find_host() is None
    assert ch.find_old_host() is None
    monkeypatch.setenv("COMFYUI_PATH_OLD", str(tmp_path / "old"))
    assert ch.find_old_host() == (tmp_path / "old").resolve()


def test_default_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("COMFYUI_PATH_OLD", raising=False)
    monkeypatch.setattr(ch, "HOST_DEFAULT", fake_host(tmp_path / "ComfyUI"))
    monkeypatch.setattr(ch, "OLD_HOST_DEFAULT", tmp_path / "absent")
    monkeypatch.setattr(ch, "PACK_ROOT", tmp_path / "checkouts" / "krea2-nodes")  # not inside a ComfyUI
    monkeypatch.setattr(ch, "__file__", str(tmp_path / "checkouts" / "krea2-nodes" / "tests" / "host" / "comfy_host.py"))
    assert ch.find_host() == tmp_path / "ComfyUI"
    assert ch.find_old_host() is None


def test_pack_inside_custom_nodes_uses_its_grandparent(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(ch, "HOST_DEFAULT", fake_host(tmp_path / "default" / "ComfyUI"))
    host = fake_host(tmp_path / "mine" / "ComfyUI")
    pack = host / "custom_nodes" / "krea2-nodes"
    monkeypatch.setattr(ch, "PACK_ROOT", pack)
    monkeypatch.setattr(ch, "__file__", str(pack / "tests" / "host" / "comfy_host.py"))
    assert ch.find_host() == host


def test_host_python_order(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PYTHON", raising=False)
    inside = fake_host(tmp_path / "a" / "ComfyUI", venv=".venv")
    assert ch.host_python(inside) == str(inside / ".venv" / "bin" / "python")
    beside = fake_host(tmp_path / "b" / "ComfyUI")
    (tmp_path / "b" / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "b" / "venv" / "bin" / "python").write_text("")
    assert ch.host_python(beside) == str(tmp_path / "b" / "venv" / "bin" / "python")
    bare = fake_host(tmp_path / "c" / "ComfyUI")
    assert ch.host_python(bare) == sys.executable
    monkeypatch.setenv("COMFYUI_PYTHON", "/opt/py")
    assert ch.host_python(inside) == "/opt/py"


def test_base_dir_layout_and_flags(tmp_path):
    h = fake_host(tmp_path / "ComfyUI")
    (h / "comfy" / "cli_args.py").write_text(
        'parser.add_argument("--base-directory")\nparser.add_argument("--output-directory")\n'
        'parser.add_argument("--database-url")\n')
    host = ch.ComfyHost(h, python="python3")
    try:
        link = host.custom_nodes_dir / ch.PACK_DIRNAME
        assert link.resolve() == ch.PACK_ROOT
        for d in ("diffusion_models", "text_encoders", "loras", "vae"):
            assert (host.models_dir / d).is_dir()
        cmd = host.command(12345)
        assert cmd[:8] == ["python3", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", "12345",
                           "--disable-auto-launch"]
        assert cmd[cmd.index("--base-directory") + 1] == str(host.base_dir)
        assert "--user-directory" not in cmd  # this fake host does not know it
        assert cmd[cmd.index("--database-url") + 1] == "sqlite:///:memory:"
        assert not (h / "custom_nodes").exists()
    finally:
        host.close()
    assert not host.base_dir.exists()
