"""Developer tooling: the embedded local stack, the load generator and `omnilog demo`.

Used only by the CLI's tooling commands and by the tests; the ingest path never imports it, and
it never imports the workers (it starts them as processes).
"""
