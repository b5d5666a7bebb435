"""The runtime: what executes a plan. The executor and its kernels, the recorder, the KV cache,
sampling, the generator and the one-step trainer."""
