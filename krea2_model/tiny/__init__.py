"""Generators of tiny random Krea 2 assets with the real interfaces, for tests, the demo and benchmarks.

* :mod:`.transformer`: transformer checkpoints in every layout (``python -m krea2_model.tiny``);
* :mod:`.text`: Qwen3-VL text towers and a tiny Qwen-style tokenizer (``python -m krea2_model.tiny.text``);
* :mod:`.lora`: LoRAs in every key style, with their hand-merged ground truth (``python -m krea2_model.tiny.lora``).
"""
