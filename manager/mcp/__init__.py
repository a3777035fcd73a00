"""The MCP gateway: every session's node tools over the Model Context Protocol at /mcp.

transport.py (HTTP: both revisions' framing, SSE, resumption) -> methods.py (initialize,
server/discover, tools/list, tools/call) -> tools.py (node tools as MCP tools, results as MCP
results), sessions.py (MCP sessions and handles in Redis), streams.py (resumable event streams
in Redis); wire.py holds the JSON-RPC shapes all of them speak.
"""
