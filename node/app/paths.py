"""Workspace confinement: every path a client or a file tool names must resolve inside the workspace."""

import os

from . import config
from .errors import NodeError


def within(path: str, root: str = None) -> bool:
    root = config.WORKSPACE if root is None else root
    if root == os.sep:
        return path.startswith(os.sep)
    return path == root or path.startswith(root + os.sep)


def resolve(path, *, what: str = "Path") -> str:
    """Return the real (symlink-free) absolute path for ``path``, or raise a 403.

    A relative path is taken from the workspace root; an absolute path must already lie inside the
    workspace. ``..`` components, absolute paths elsewhere and symlinks (anywhere along the path,
    dangling ones included) that lead out of the workspace are all refused.
    """
    if not isinstance(path, str):
        raise NodeError(422, f"{what} must be a string")
    if "\x00" in path:
        raise NodeError(422, f"{what} contains a NUL byte")
    root = config.WORKSPACE
    lexical = os.path.normpath(path) if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))
    if not within(lexical, root):
        raise NodeError(403, f"{what} {path!r} is outside the workspace")
    real = os.path.realpath(lexical)
    if not within(real, root):
        raise NodeError(403, f"{what} {path!r} resolves outside the workspace (symlink)")
    return real


def relative(real_path: str) -> str:
    rel = os.path.relpath(real_path, config.WORKSPACE)
    return "" if rel == "." else rel


def ensure_workspace() -> None:
    try:
        os.makedirs(config.WORKSPACE, exist_ok=True)
    except OSError:
        pass
