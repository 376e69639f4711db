#!/usr/bin/env bash
# docker-compose only, run once as root before the other Airflow services: create and chown
# every mounted path for the airflow user (named volumes are created root-owned), migrate
# Airflow's metadata database and size the pool extract_features runs in (one slot per GPU).
# Safe to run again.
set -euo pipefail
owner="${AIRFLOW_UID:-50000}:0"
# AIRFLOW_INIT_DIRS: the mount points (the default is the compose file's; the Celery topology test
# passes its local directories).
dirs="${AIRFLOW_INIT_DIRS:-/opt/airflow/logs /opt/airflow/thumbnails /opt/airflow/auth /home/airflow/.keras}"
for dir in $dirs; do
    mkdir -p "$dir"
done
airflow db migrate
airflow pools set "${AIRFLOW_VAR_SIMILARITY_GPU_POOL:-gpu}" "${SIMILARITY_GPU_SLOTS:-1}" \
    "Feature extraction: one slot per GPU"
# Last, so files the commands above wrote as root (logs) belong to the airflow user too.
for dir in $dirs; do
    chown -R "$owner" "$dir"
done
