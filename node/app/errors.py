"""The one exception type handlers and tools raise to produce an HTTP error."""


class NodeError(Exception):
    """An error with an HTTP status and a JSON-serialisable ``detail`` (FastAPI's error shape):
    403 path outside the workspace, 404 unknown tool/file, 406 bad tool code, 422 bad input,
    500 failing tool."""

    def __init__(self, status: int, detail):
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.status = status
        self.detail = detail
