"""The compiler: IR, tracing, reverse rules, passes and the plan file. Imports no runtime."""
