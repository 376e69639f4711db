"""The shared core: one module per concern that more than one stage needs.

Nothing here imports a stage (enforced by the import contracts in `pyproject.toml`).
"""
