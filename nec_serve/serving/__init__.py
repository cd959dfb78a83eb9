"""Serving: the local Triton server, the Triton Python-backend model and the client."""

__all__: list[str] = []
