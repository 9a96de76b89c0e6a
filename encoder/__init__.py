"""The attribute encoder: image + attribute text -> tokens for the generator and a pooled vector for search."""
