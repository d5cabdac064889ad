"""Persistence shared by the API and the worker: tables, engine, repositories."""
