"""Training data: the pair dataset format and the seeded procedural pair generator."""
