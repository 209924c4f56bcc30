"""Alias kept for the command ``python -m krea2_model.tiny_lora``: runs ``python -m krea2_model.tiny.lora``."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("krea2_model.tiny.lora", run_name="__main__")
