"""Host adapters: our pure-PyTorch Krea 2 pieces wired into ComfyUI's model management."""
