"""The engine version: one place, read by the package, the plan file and pyproject.toml."""

__version__ = "0.1.0"
