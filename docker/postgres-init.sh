#!/usr/bin/env bash
# Run once by the postgres image at its first start (docker-entrypoint-initdb.d): the databases of the
# stack, owned by POSTGRES_USER: `prefect` (Prefect's server) and `predictions` (the service's store).
set -euo pipefail
for db in prefect predictions; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\""
done
