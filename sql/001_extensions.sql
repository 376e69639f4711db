-- pgvector provides the vector type, distance operators and HNSW indexes.
CREATE EXTENSION IF NOT EXISTS vector;
