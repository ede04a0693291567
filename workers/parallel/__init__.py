"""Parallelism wrappers around single-device models: DeepSpeed config, engine building, pipeline stages,
expert parallelism."""
