"""CLI sub-commands. Each module has ``register(subparsers)``; see :mod:`snapfs.cli`."""
