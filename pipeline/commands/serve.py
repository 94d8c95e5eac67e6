"""`omnilog serve`: the tenant-isolated read API over HTTP (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.settings import load_settings


@click.command("serve")
@click.option("--host", default=None, help="Listen address [default: OMNILOG_API_HOST].")
@click.option("--port", type=int, default=None, help="Listen port [default: OMNILOG_API_PORT].")
@click.option("--env-file", type=click.Path(path_type=Path))
def command(host: str | None, port: int | None, env_file: Path | None) -> None:
    """Serve logs, stored events, aggregates and usage to organization API keys.

    Connects to PostgreSQL as OMNILOG_API_DATABASE_URL, a role under row security (refuses to
    start otherwise); /healthz, /readyz and /metrics are on the same port.
    """
    import logging

    import uvicorn

    from pipeline.api.app import create_app

    settings = load_settings(env_file)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.api_host,
        port=settings.api_port if port is None else port,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        # Bounded headers and request line (h11's limit of an incomplete event), as for bodies.
        h11_max_incomplete_event_size=16 * 1024,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
