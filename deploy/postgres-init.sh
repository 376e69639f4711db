#!/bin/sh
# docker-compose only: create the similarity database next to Airflow's metadata database.
# The pipeline applies the numbered .sql files itself on its first run.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE similarity;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname similarity -c 'CREATE EXTENSION IF NOT EXISTS vector;'
