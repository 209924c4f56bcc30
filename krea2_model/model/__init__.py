"""The Krea 2 transformer: its layers, the one attention function, the text-stage cache, and the
host-free ``operations`` namespace (:mod:`.ops`) for fp8 storage without a host."""
