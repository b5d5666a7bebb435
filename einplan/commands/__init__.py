"""One module per ``einplan`` subcommand; each has ``register(subparsers)`` adding its parser
(with ``func`` set to the function that runs it). The CLI registers them in this order."""

COMMANDS = [
    "compile",
    "eval",
    "run",
    "convert",
    "quantize",
    "lora",
    "quant_report",
    "train",
    "graph",
    "report",
    "bench",
    "serve",
]
