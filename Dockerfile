# Airflow image with the pipeline's dependencies (TensorFlow, pgvector, ...).
# The GPU worker uses the same image: TensorFlow's wheel finds CUDA when the
# container is given an NVIDIA device (see docker-compose.yml).
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt constraints.txt /opt/sketchfab/
RUN pip install --no-cache-dir -r /opt/sketchfab/requirements.txt -c /opt/sketchfab/constraints.txt
COPY sql /opt/sketchfab/sql
ENV SIMILARITY_SQL_DIR=/opt/sketchfab/sql
