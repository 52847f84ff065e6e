"""Sandboxed execution of candidate code: static checks, the worker and its backends."""
