"""The host's HTTP API client lives in the package (``krea2_model.tiny.host_api``); this name is the same module,
for the tests' imports."""

import sys

from krea2_model.tiny import host_api

sys.modules[__name__] = host_api
