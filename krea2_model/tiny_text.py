"""Alias kept for the command ``python -m krea2_model.tiny_text``: runs ``python -m krea2_model.tiny.text``."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("krea2_model.tiny.text", run_name="__main__")
