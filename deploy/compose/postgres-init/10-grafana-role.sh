#!/bin/sh
# Runs once, when the compose Postgres volume is first created: a login role for Grafana that can
# read everything `omnilog migrate` creates later (default privileges) and change nothing.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v grafana_password="$OMNILOG_GRAFANA_PG_PASSWORD" <<'SQL'
CREATE ROLE omnilog_grafana LOGIN PASSWORD :'grafana_password';
GRANT CONNECT ON DATABASE omnilog TO omnilog_grafana;
GRANT USAGE ON SCHEMA public TO omnilog_grafana;
ALTER DEFAULT PRIVILEGES FOR ROLE omnilog IN SCHEMA public GRANT SELECT ON TABLES TO omnilog_grafana;
ALTER ROLE omnilog_grafana SET default_transaction_read_only = on;
ALTER ROLE omnilog_grafana SET statement_timeout = '30s';
SQL
