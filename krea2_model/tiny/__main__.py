"""``python -m krea2_model.tiny``: the tiny transformer generator (see :mod:`krea2_model.tiny.transformer`)."""

from .transformer import main

main()
