"""FileSystemEnv tools and the workspace helpers behind /get_workspace_structure and /download_workspace.

All functions here are synchronous; the server runs them in a worker thread.
"""

import fnmatch
import os
import stat

from . import config
from .errors import NodeError
from .paths import relative, resolve


def _ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in config.IGNORED)


def _existing_file(filepath: str) -> str:
    real = resolve(filepath, what="File")
    if _ignored(real) or not os.path.isfile(real):
        raise NodeError(500, f"File {filepath} not found in workspace.")
    return real


def print_filesys_struture(return_root: bool = False) -> str:
    root = config.WORKSPACE
    out = []
    if return_root:
        out.append(f"Global Root Work Directory: {root}")

    def walk(path: str, level: int) -> None:
        indent = " " * 4 * level
        out.append(f"{indent}- {os.path.basename(path) or path}/")
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        files = [e for e in entries if not e.is_dir(follow_symlinks=False)]
        sub = " " * 4 * (level + 1) + "- "
        shown = 0
        for entry in files:
            if _ignored(entry.name) or _ignored(entry.path):
                continue
            shown += 1
            if shown > config.MAX_ENTRIES_PER_LEVEL:
                out.append(f"{sub}`wrapped`")
                break
            out.append(f"{sub}{entry.name}")
        shown = 0
        for entry in dirs:
            if _ignored(entry.path + "/"):
                continue
            shown += 1
            if shown > config.MAX_ENTRIES_PER_LEVEL:
                out.append(f"{sub}`wrapped`")
                break
            walk(entry.path, level + 1)

    walk(root, 0)
    return "\n".join(out) + "\n"


def _read_lines(real: str) -> list:
    with open(real, encoding="utf-8", errors="replace", newline=None) as f:
        return f.readlines(100_000)


def _numbered(lines: list, line_number: int) -> str:
    if not lines:
        if line_number in (0, 1, -1):
            return ""
        raise NodeError(500, f"Line number {line_number} is out of range.")
    if not abs(line_number) - 1 < len(lines):
        raise NodeError(500, f"Line number {line_number} is out of range.")
    if line_number == 0:
        index, chosen = 1, lines
    elif line_number > 0:
        index, chosen = line_number, lines[line_number - 1:]
    else:
        index, chosen = len(lines) + line_number + 1, lines[line_number:]
    parts = []
    for line in chosen:
        parts.append(f"{index}".rjust(5) + ": " + line)
        index += 1
    return "".join(parts)


def read_from_file(filepath: str, line_number: int = 1) -> str:
    real = _existing_file(filepath)
    return _numbered(_read_lines(real), line_number)


def _target_for_write(filepath: str) -> str:
    real = resolve(filepath, what="File")
    if real == config.WORKSPACE or _ignored(real):
        raise NodeError(403, f"File {filepath} cannot be written.")
    if os.path.exists(real) and not os.path.isfile(real):
        raise NodeError(500, f"File {filepath} is not a file.")
    return real


def _write_lines(real: str, lines: list) -> None:
    lines = [line if line.endswith("\n") else line + "\n" for line in lines]
    with open(real, "w", encoding="utf-8") as f:
        f.writelines(lines)


def write_to_file(filepath: str, content: str, truncating: bool = False, line_number: int = None,
                  overwrite: bool = False) -> str:
    real = _target_for_write(filepath)
    if not os.path.exists(real):
        if line_number not in (None, 0, 1):
            raise NodeError(500, f"File {filepath} not found in workspace.")
        os.makedirs(os.path.dirname(real), exist_ok=True)
        lines = []
    elif truncating:
        lines = []
    else:
        with open(real, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    new_lines = content.splitlines(keepends=True)
    if line_number is None:
        lines.extend(new_lines)
    else:
        index = line_number - 1 if line_number >= 1 else line_number
        if overwrite:
            end = index + len(new_lines)
            lines[index:end if end != 0 else None] = new_lines
        else:
            lines[index:index] = new_lines
    _write_lines(real, lines)
    return read_from_file(real)


def modify_file(filepath: str, new_content: str, start_index: int = None, end_index: int = None) -> str:
    real = _target_for_write(filepath)
    if not os.path.isfile(real):
        if start_index not in (None, 0) or end_index is not None:
            raise NodeError(500, f"File {filepath} not found in workspace.")
        os.makedirs(os.path.dirname(real), exist_ok=True)
        lines = []
    else:
        with open(real, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    new_lines = new_content.splitlines(keepends=True)
    if start_index is None:
        lines.extend(new_lines)
    else:
        lines[start_index:start_index if end_index is None else end_index] = new_lines
    _write_lines(real, lines)
    return read_from_file(real)


# --- workspace-wide helpers for the HTTP routes ---------------------------------------------------
def workspace_structure() -> dict:
    def node(path: str, name: str) -> dict:
        try:
            st = os.lstat(path)
        except OSError:
            return {"name": name, "type": "file"}
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    names = sorted(e.name for e in it)
            except OSError:
                names = []
            return {"name": name, "type": "directory",
                    "children": [node(os.path.join(path, n), n) for n in names]}
        return {"name": name, "type": "file"}  # symlinks are listed, never followed

    root = config.WORKSPACE
    return node(root, os.path.basename(root))


def zip_workspace(dest: str) -> int:
    """Write the workspace's regular files into the zip ``dest``; symlinks and special files are
    skipped (never followed out of the workspace). Returns the number of files stored."""
    import zipfile

    count = 0
    root = config.WORKSPACE
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for dirpath, dirnames, filenames in os.walk(root):  # does not descend into symlinked dirs
            dirnames.sort()
            rel_dir = relative(dirpath)
            if rel_dir and not filenames and not dirnames:
                zf.writestr(rel_dir + "/", b"")
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                try:
                    zf.write(path, os.path.join(rel_dir, name))
                    count += 1
                except OSError:
                    continue
    return count
