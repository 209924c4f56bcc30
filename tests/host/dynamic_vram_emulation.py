"""A test-only custom node module: a CPU ComfyUI whose loader nodes build models as dynamic VRAM does.

Copied by ``tests/host/test_host_dynamic_vram.py`` as ``custom_nodes/krea2_dynamic_vram_emulation/__init__.py``
of a second host (never part of the pack). While a loader node runs (core's UNETLoader and CLIPLoader, our
Krea2ModelLoader and Krea2TextEncoderLoader) the construction flag ``comfy.memory_management.aimdo_enabled`` is on
and ``CoreModelPatcher`` is the dynamic patcher, as on an NVIDIA GPU with ComfyUI's default flags; files are
read with the flag off, because aimdo's zero-copy reader needs a running aimdo, which a CPU cannot start (see
``tests/host/dynamic_vram_check.py`` for why this is faithful). Every loader run is appended to the JSON-lines
file ``$KREA2_EMULATION_LOG``: the node, how many Linear layers the host built lazily, and any error.
"""

import json
import os

import comfy.memory_management as mem
import comfy.model_patcher as mp
import comfy.ops
import comfy.utils
import execution

LOADERS = {"UNETLoader", "CLIPLoader", "Krea2ModelLoader", "Krea2TextEncoderLoader"}
LOG = os.environ.get("KREA2_EMULATION_LOG")
_count = [0]
_read = comfy.utils.load_torch_file
_linear_init = comfy.ops.disable_weight_init.Linear.__init__
_get_output_data = execution.get_output_data


def _read_flag_off(*args, **kwargs):
    was = mem.aimdo_enabled
    mem.aimdo_enabled = False
    try:
        return _read(*args, **kwargs)
    finally:
        mem.aimdo_enabled = was


def _counting_init(self, *args, **kwargs):
    _linear_init(self, *args, **kwargs)
    _count[0] += self.__dict__.get("weight", 0) is None


async def _get_output_data_emulated(prompt_id, unique_id, obj, *args, **kwargs):
    name = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    if name not in LOADERS:
        return await _get_output_data(prompt_id, unique_id, obj, *args, **kwargs)
    saved = mem.aimdo_enabled, mp.CoreModelPatcher
    mem.aimdo_enabled, mp.CoreModelPatcher = True, mp.ModelPatcherDynamic
    _count[0] = 0
    entry = {"node": name, "id": str(unique_id)}
    try:
        return await _get_output_data(prompt_id, unique_id, obj, *args, **kwargs)
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        mem.aimdo_enabled, mp.CoreModelPatcher = saved
        entry["lazy_layers"] = _count[0]
        if LOG:
            with open(LOG, "a") as f:
                f.write(json.dumps(entry) + "\n")


comfy.utils.load_torch_file = _read_flag_off
comfy.ops.disable_weight_init.Linear.__init__ = _counting_init
execution.get_output_data = _get_output_data_emulated

NODE_CLASS_MAPPINGS = {}
