"""The service layer shared by the API and the worker: settings, persistence, storage, CLI.

Nothing in this package imports FastAPI: the worker imports it too.
"""
