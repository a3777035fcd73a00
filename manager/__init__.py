"""A manager replica: the HTTP edge, the proxy to each session's node, and the APIs around them.

Rooms, each importing only those listed after it (tests/unit/test_layers.py checks it):
the top (app, main, entry, routing, openapi) > console, forks > events > admin, mcp > proxy >
session > edge, replica.
"""
