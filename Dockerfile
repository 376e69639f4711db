# syntax=docker/dockerfile:1
# Airflow with the pipeline's dependencies and code. Two targets:
#   base  scheduler, api-server, dag-processor, triggerer and CPU workers
#   gpu   GPU workers: the same plus TensorFlow's CUDA libraries (used when the
#         container is given an NVIDIA device, see docker-compose.yml)
# The code is baked in so the image also works where nothing is mounted
# (Kubernetes executor pods); docker-compose.yml mounts the checkout over it.
FROM apache/airflow:3.3.2-python3.11 AS base
COPY requirements.txt constraints.txt /opt/sketchfab/
RUN pip install --no-cache-dir -r /opt/sketchfab/requirements.txt -c /opt/sketchfab/constraints.txt
COPY sql /opt/sketchfab/sql
COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
ENV SIMILARITY_SQL_DIR=/opt/sketchfab/sql

FROM base AS gpu
RUN pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0" -c /opt/sketchfab/constraints.txt
