"""The host harness lives in the package (``krea2_model.tiny.comfy_server``: the demo uses it too, and the product
never imports its tests); this name is the same module, for the tests' imports."""

import sys

from krea2_model.tiny import comfy_server

sys.modules[__name__] = comfy_server
