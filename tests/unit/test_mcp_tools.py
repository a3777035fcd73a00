"""Node tools as MCP tools: pure mapping, checked against the SDK's own rules."""

from __future__ import annotations

import json

from mcp.shared.inbound import find_invalid_x_mcp_header, validate_mcp_param_headers, x_mcp_header_map

from manager.mcp import tools

NODE_TOOLS = [
    {"name": "shell_command_executor", "description": "Run bash.",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": []}},
    {"name": "bad name with spaces", "description": "skipped", "parameters": {}},
    {"name": "upload_file", "description": "a node tool may not shadow the gateway's", "parameters": {}},
    "not a tool",
    {"name": "no_params", "description": 3},
]


def test_node_tools_map_to_mcp_tools_and_bad_entries_are_skipped() -> None:
    listed = tools.from_node(NODE_TOOLS)
    assert [t["name"] for t in listed] == ["shell_command_executor", "no_params"]
    assert listed[0]["inputSchema"]["properties"]["command"] == {"type": "string"}
    assert listed[1]["inputSchema"] == {"type": "object", "properties": {}} and listed[1]["description"] == "3"
    assert tools.from_node({"not": "a list"}) == []


def test_the_handle_is_a_routed_argument_the_sdk_accepts() -> None:
    for tool in [tools.UPLOAD_TOOL, *tools.from_node(NODE_TOOLS), tools.RELEASE_TOOL]:
        schema = tools.with_handle(tool)["inputSchema"] if tool is not tools.RELEASE_TOOL else tool["inputSchema"]
        assert find_invalid_x_mcp_header(schema) is None, schema
        assert x_mcp_header_map(schema) == {("session",): "Session"}
        assert schema["required"][0] == "session"
    args = {"session": "h1", "command": "ls"}
    assert validate_mcp_param_headers(tools.HEADER_SCHEMA, args, {"mcp-param-session": "h1"}) is None
    assert validate_mcp_param_headers(tools.HEADER_SCHEMA, args, {"mcp-param-session": "h2"}).code == -32020
    assert validate_mcp_param_headers(tools.HEADER_SCHEMA, args, {}).code == -32020


def test_node_answers_become_tool_results_and_node_errors_tool_errors() -> None:
    ok = tools.node_result(200, json.dumps({"ReturnCode": 0, "display": "hi"}).encode())
    assert ok["isError"] is False and json.loads(ok["content"][0]["text"]) == {"ReturnCode": 0, "display": "hi"}
    assert tools.node_result(200, b'"plain text"')["content"][0]["text"] == "plain text"
    bad = tools.node_result(500, json.dumps({"detail": "File x not found in workspace."}).encode())
    assert bad["isError"] is True and "File x not found" in bad["content"][0]["text"]
    assert tools.node_result(502, b"<html>not json</html>")["isError"] is True
