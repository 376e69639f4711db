#!/usr/bin/env bash
# docker-compose only: migrate Airflow's metadata database and create the pool that
# extract_features runs in (one slot per GPU worker). Safe to run again.
set -euo pipefail
airflow db migrate
airflow pools set "${AIRFLOW_VAR_SIMILARITY_GPU_POOL:-gpu}" "${SIMILARITY_GPU_SLOTS:-1}" \
    "Feature extraction: one slot per GPU"
