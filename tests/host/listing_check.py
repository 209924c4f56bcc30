"""Model listing (``nodes/files.py``) in a real ComfyUI, in-process: files come from the host's own cached lists
(no walk of ours per listing), a symlink cycle adds no copies, folder entries are one level deep.

    <host python> tests/host/listing_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "root"}`` (an empty folder to build the model tree in). Prints one
JSON line.
"""

import json
import os

from host_script import boot  # noqa: E402

spec, pack = boot()

import folder_paths  # noqa: E402

root = spec["root"]
d1, d2 = os.path.join(root, "diffusion_models"), os.path.join(root, "unet")
for d in (d1, d2, os.path.join(d1, "sub"), os.path.join(d1, "krea2_diffusers", "transformer")):
    os.makedirs(d, exist_ok=True)
for f in ("a.safetensors", os.path.join("sub", "b.gguf"), os.path.join("krea2_diffusers", "transformer",
                                                                        "diffusion_pytorch_model.safetensors")):
    open(os.path.join(d1, f), "wb").close()
open(os.path.join(d2, "c.gguf"), "wb").close()
os.symlink(d1, os.path.join(d1, "loop"))                 # a cycle: diffusion_models/loop -> diffusion_models
folder_paths.folder_names_and_paths["diffusion_models"] = ([d1, d2], set(folder_paths.supported_pt_extensions))

files = pack("nodes.files")
first = files.list_files("diffusion_models")

walks = []
real_walk = os.walk


def counting_walk(*args, **kwargs):
    walks.append(args[0] if args else kwargs.get("top"))
    return real_walk(*args, **kwargs)


os.walk = counting_walk
second = files.list_files("diffusion_models")
os.walk = real_walk
open(os.path.join(d2, "d.gguf"), "wb").close()           # a new file: the host's cache sees its folder change
third = files.list_files("diffusion_models")
print(json.dumps({"first": first, "second": second, "walks_second": walks, "third": third,
                  "resolved": files.resolve("diffusion_models", "sub/b.gguf")}))
