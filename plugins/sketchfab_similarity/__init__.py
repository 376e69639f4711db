"""Visual-similarity recommendations for Sketchfab models.

One module per pipeline stage, each usable without Airflow:
crawl -> thumbnails -> features -> vectors -> similarity. Configuration lives in
`settings`, database access in `db`.
"""
