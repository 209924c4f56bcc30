"""Every file format the pack reads: safetensors files and shard folders, transformer and text-encoder
checkpoint layouts (with ComfyUI's scaled and quantized weights), and LoRAs of every key style."""
