"""Prefect flows: thin orchestration (fan-out, retries, reports) over wsimil functions."""
