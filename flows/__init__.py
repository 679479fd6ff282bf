"""Prefect orchestration of the DVC pipeline declared in dvc.yaml."""
