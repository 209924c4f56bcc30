"""The Qwen3-VL text side: the language tower, the Qwen tokenizer, Krea 2's prompt layout, the encoder."""
