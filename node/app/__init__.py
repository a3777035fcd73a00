"""toolserver-node: the per-session sandbox server (XAgent ToolServerNode compatible API).

Kept import-free on purpose: ``python3 -m app`` must be listening within a few tens of milliseconds,
so every module imports its heavy dependencies lazily.
"""

__version__ = "1.0.0"
