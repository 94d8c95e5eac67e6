"""The tenant-isolated read API behind `omnilog serve` (docs/security.md).

Tooling-level, like the CLI: it reads through the sinks (read path, aggregates, API keys) and is
imported by no worker.
"""
