"""Model definitions and their configs: what traces into a graph."""
