"""The HTTP front: socket lifecycle (server.py), one call over ASGI (streaming.py), the routes (routes.py)."""
