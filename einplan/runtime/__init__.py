"""The runtime: executes plan files over preallocated buffers and times every step."""
