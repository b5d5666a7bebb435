"""Compiler passes: each module has one pure ``run(graph, ctx) -> Graph``."""
