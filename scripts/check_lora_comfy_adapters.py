"""Cross-check krea2_model.formats.lora.to_comfy_patches against a real ComfyUI's weight adapters (not a unit test:
it imports ``comfy`` in-process).

    COMFYUI_PATH=/path/to/ComfyUI python scripts/check_lora_comfy_adapters.py

For every generated LoRA style, each patch handed to ComfyUI's ``LoRAAdapter`` / ``LoKrAdapter`` /
``LoHaAdapter`` (or applied as a ``("diff", ...)`` entry) must give the weight ``merge_into`` gives, at
strength 0.7. Exits non-zero on a mismatch. Needs ComfyUI's own light dependencies (psutil, comfy-aimdo).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
host = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/comfy/ComfyUI")
sys.path.insert(0, host)
sys.argv = [sys.argv[0], "--cpu"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.weight_adapter as wa  # noqa: E402
import torch  # noqa: E402

from krea2_model.formats import lora  # noqa: E402
from krea2_model.tiny.transformer import CONFIGS, random_state_dict  # noqa: E402
from krea2_model.tiny.lora import STYLES, make_lora  # noqa: E402


def main() -> int:
    cfg = CONFIGS["gqa"]
    sd = random_state_dict(cfg, 0)
    adapters = {"lora": wa.LoRAAdapter, "lokr": wa.LoKrAdapter, "loha": wa.LoHaAdapter}
    strength, bad = 0.7, 0
    for style in STYLES:
        tl = make_lora(cfg, style, seed=3)
        patches, _ = lora.parse_lora(tl.state_dict, cfg, metadata=tl.metadata)
        cp = lora.to_comfy_patches(patches, adapters=adapters, base_weights=sd)
        ref = lora.merge_into(sd, patches, strength)
        worst = 0.0
        for k, v in cp.items():
            ck = k[len("diffusion_model."):]
            w = sd[ck].clone().float()
            if isinstance(v, wa.WeightAdapterBase):
                out = v.calculate_weight(w, k, strength, 1.0, None, lambda a: a, torch.float32)
            else:
                out = w + strength * v[1][0].float().reshape(w.shape)
            worst = max(worst, ((out - ref[ck]).abs().max() / ref[ck].abs().max()).item())
        ok = worst <= 1e-5
        bad += not ok
        print(f"{style:16s} {len(cp):3d} patches  max rel err {worst:.1e}  {'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
