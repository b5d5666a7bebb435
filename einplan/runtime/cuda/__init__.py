"""The cuda device: the plan's steps on an NVIDIA GPU through CuPy (kernels.py, backend.py),
each bound entry replayed as one CUDA graph (runner.py). Imported only for ``--device cuda``."""
