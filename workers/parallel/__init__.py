"""Parallelism wrappers around single-device models: DeepSpeed config, pipeline stages, expert parallelism."""
