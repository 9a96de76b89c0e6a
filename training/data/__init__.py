"""Training data: the pair format, the procedural pair generator and the real-photo builder."""
