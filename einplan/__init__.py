"""einplan: Llama-family models traced into einsum graphs, compiled to plans, run on NumPy."""

__version__ = "0.1.0"

from einplan.api import Session, compile_model, load_plan  # noqa: E402

__all__ = ["Session", "compile_model", "load_plan", "__version__"]
