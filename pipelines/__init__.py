"""Prefect flows and deployments: thin callers of the cxrlt library (paths and tags in, paths and tags out)."""
