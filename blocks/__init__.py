"""Prefect Block types: the credentials and the client of each external system."""
