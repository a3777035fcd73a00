"""The node image end to end: a real container, every route called through 127.0.0.1:<published port>.

No mocks: tools really run inside the container (bash, a Python kernel, file I/O on a tmpfs
workspace with a read-only root filesystem).
"""

import hashlib
import io
import json
import os
import threading
import time
import zipfile

import pytest

XAGENT_TOOLS = [
    "FileSystemEnv_print_filesys_struture",
    "FileSystemEnv_read_from_file",
    "FileSystemEnv_write_to_file",
    "PythonNotebook_execute_cell",
    "PythonNotebook_print_notebook",
    "WebEnv_search_and_browse",
    "WebEnv_browse_website",
    "shell_command_executor",
]
XAGENT_ENVS = ["FileSystemEnv", "PythonNotebook", "WebEnv"]


def absent(node, path):
    code, _ = node.sh(f"test -e {path} || test -L {path}")
    return code != 0


# --- basics and catalogue ------------------------------------------------------------------------
def test_root_get_and_post(node):
    for method in ("GET", "POST"):
        r = node.http.request(method, "/")
        assert r.status_code == 200
        assert r.json() == {"message": "Hello World"}


def test_runs_as_uid_1000_on_read_only_root(node):
    r = node.tool("shell_command_executor", command="id -u; touch /opt/x 2>&1 || echo ro-ok")
    assert r.status_code == 200, r.text
    display = r.json()["data"]["display"]
    assert "1000" in display and "ro-ok" in display


def test_available_tools_match_xagent(node):
    r = node.post("/get_available_tools")
    assert r.status_code == 200
    body = r.json()
    assert body["available_tools"] == XAGENT_TOOLS
    assert [e["name"] for e in body["available_envs"]] == XAGENT_ENVS
    fs = body["available_envs"][0]
    assert fs["tools"] == ["print_filesys_struture", "read_from_file", "write_to_file"]
    assert set(fs) == {"name", "description", "total_tools", "tools"}
    by_name = {t["name"]: t for t in body["tools_json"]}
    assert list(by_name) == XAGENT_TOOLS
    for t in body["tools_json"]:
        assert set(t) == {"name", "description", "parameters"}
        assert t["parameters"]["type"] == "object"
    write = by_name["FileSystemEnv_write_to_file"]["parameters"]
    assert list(write["properties"]) == ["filepath", "truncating", "line_number", "overwrite", "content"]
    assert write["required"] == ["filepath", "content"]
    assert write["properties"]["line_number"]["type"] == "integer"
    cell = by_name["PythonNotebook_execute_cell"]["parameters"]
    assert list(cell["properties"]) == ["code", "cell_index", "reset"] and cell["required"] == ["code"]
    shell = by_name["shell_command_executor"]["parameters"]
    assert list(shell["properties"]) == ["command", "run_async", "shell_id", "kill"]
    assert shell["required"] == []


def test_json_schema_for_tools_and_envs(node):
    r = node.post("/get_json_schema_for_tools",
                  json={"tool_names": ["FileSystemEnv_read_from_file", "no_such_tool"]})
    assert r.status_code == 200
    body = r.json()
    assert [t["name"] for t in body["tools_json"]] == ["FileSystemEnv_read_from_file"]
    assert body["missing_tools"] == ["no_such_tool"]
    r = node.post("/get_json_schema_for_envs", json={"env_names": ["PythonNotebook", "Nope"]})
    assert r.status_code == 200
    body = r.json()
    assert body["missing_envs"] == ["Nope"]
    assert body["envs_json"][0]["name"] == "PythonNotebook"
    assert body["envs_json"][0]["tools"] == ["execute_cell", "print_notebook"]
    # invisible legacy tools are listed when an env is asked for explicitly
    r = node.post("/get_json_schema_for_envs", json={"env_names": ["FileSystemEnv"]})
    assert "modify_file" in r.json()["envs_json"][0]["tools"]


def test_retrieving_tools(node):
    r = node.post("/retrieving_tools", json={"question": "write some text into a file", "top_k": 3})
    assert r.status_code == 200
    body = r.json()
    assert len(body["retrieved_tools"]) <= 3
    assert "FileSystemEnv_write_to_file" in body["retrieved_tools"]
    assert [t["name"] for t in body["tools_json"]] == body["retrieved_tools"]
    r = node.post("/retrieving_tools", json={"question": "run python code in a notebook cell"})
    assert r.json()["retrieved_tools"][0] == "PythonNotebook_execute_cell"
    assert node.post("/retrieving_tools", json={"top_k": 2}).status_code == 422


# --- file system tools ---------------------------------------------------------------------------
def test_filesystem_tools(node):
    r = node.tool("FileSystemEnv_write_to_file", filepath="fs/notes.txt", content="alpha\nbeta")
    assert r.status_code == 200, r.text
    assert r.json() == "    1: alpha\n    2: beta\n"
    r = node.tool("FileSystemEnv_write_to_file", filepath="fs/notes.txt", content="inserted", line_number=2)
    assert r.json() == "    1: alpha\n    2: inserted\n    3: beta\n"
    r = node.tool("FileSystemEnv_write_to_file", filepath="fs/notes.txt", content="BETA", line_number=3,
                  overwrite=True)
    assert r.json() == "    1: alpha\n    2: inserted\n    3: BETA\n"
    r = node.tool("FileSystemEnv_read_from_file", filepath="fs/notes.txt", line_number=2)
    assert r.json() == "    2: inserted\n    3: BETA\n"
    r = node.tool("read_from_file", env_name="FileSystemEnv", filepath="/app/workspace/fs/notes.txt",
                  line_number=-1)
    assert r.status_code == 200 and r.json() == "    3: BETA\n"
    r = node.tool("FileSystemEnv_write_to_file", filepath="fs/notes.txt", content="fresh", truncating=True)
    assert r.json() == "    1: fresh\n"
    r = node.tool("FileSystemEnv_modify_file", filepath="fs/notes.txt", new_content="zero", start_index=0)
    assert r.json() == "    1: zero\n    2: fresh\n"
    r = node.tool("FileSystemEnv_print_filesys_struture", return_root=True)
    assert r.status_code == 200
    tree = r.json()
    assert tree.startswith("Global Root Work Directory: /app/workspace")
    assert "    - fs/\n        - notes.txt\n" in tree
    r = node.tool("FileSystemEnv_read_from_file", filepath="fs/missing.txt")
    assert r.status_code == 500 and "not found" in r.json()["detail"]
    _code, out = node.sh("cat /app/workspace/fs/notes.txt")
    assert out == "zero\nfresh\n"


def test_escapes_are_refused_and_nothing_is_written(node):
    r = node.tool("shell_command_executor",
                  command="ln -sfn /tmp tmplink && ln -sfn /etc/passwd pw && ln -sfn /tmp/dangling dl")
    assert r.status_code == 200, r.text
    reads = ["../../etc/passwd", "/etc/passwd", "pw", "tmplink/../../etc/passwd"]
    for path in reads:
        r = node.tool("FileSystemEnv_read_from_file", filepath=path)
        assert r.status_code == 403, (path, r.text)
        assert "root:" not in r.text
    writes = {"../../tmp/dotdot.txt": "/tmp/dotdot.txt", "/tmp/abs.txt": "/tmp/abs.txt",
              "tmplink/via_link.txt": "/tmp/via_link.txt", "dl": "/tmp/dangling"}
    for path, outside in writes.items():
        r = node.tool("FileSystemEnv_write_to_file", filepath=path, content="escaped")
        assert r.status_code == 403, (path, r.text)
        r = node.tool("FileSystemEnv_modify_file", filepath=path, new_content="escaped")
        assert r.status_code == 403, (path, r.text)
        assert absent(node, outside), outside
    for path in ["../etc/passwd", "/etc/passwd", "pw", "workspace/../../etc/passwd"]:
        r = node.post("/download_file", json={"file_path": path})
        assert r.status_code == 403, (path, r.status_code)
        assert "root:" not in r.text
    for name in ["../../tmp/up.txt", "/tmp/up.txt", "tmplink/up.txt"]:
        r = node.post("/upload_file", files={"file": (name, b"escaped")})
        assert 400 <= r.status_code < 500, (name, r.status_code)
        assert absent(node, "/tmp/up.txt")
    # the zip of the workspace does not follow the links out
    r = node.post("/download_workspace")
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert not any(n.startswith(("tmplink", "pw")) for n in names)
    node.tool("shell_command_executor", command="rm -f tmplink pw dl")


# --- shell ---------------------------------------------------------------------------------------
def test_shell_command(node):
    r = node.tool("shell_command_executor", command="echo out; echo err >&2; pwd")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["ReturnCode"] == 0
    assert "\nstdout:\nout\n/app/workspace\n" in data["display"]
    assert "\nstderr:\nerr\n" in data["display"]
    r = node.tool("shell_command_executor", command="echo partial; exit 3")
    assert r.status_code == 500
    assert r.json()["detail"]["ReturnCode"] == 3 and "partial" in r.json()["detail"]["display"]
    r = node.tool("shell_command_executor", command="exit 4", kill=True)  # kill: non-zero is no failure
    assert r.status_code == 200 and r.json()["data"]["ReturnCode"] == 4


def test_shell_timeout_kills_command(node):
    # the tool timeout is short in this fixture: a 30 s sleep must come back well inside the
    # client's own 10 s limit (a ReadTimeout here means the command was not killed)
    r = node.http.post("/execute_tool", timeout=10, json={
        "tool_name": "shell_command_executor", "arguments": {"command": "echo started; sleep 30"}})
    assert r.status_code == 500
    assert "Timeout" in r.json()["detail"] and "started" in r.json()["detail"]
    # killed, not left to run its 30 s: gone within a few seconds of the answer (kill is asynchronous)
    for _ in range(100):
        _code, out = node.sh("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null"
                            " | grep -c '^sleep 30' || true")
        if out.strip() == "0":
            break
        time.sleep(0.05)
    assert out.strip() == "0", "the timed-out command is still running"


def test_shell_async_session(node):
    r = node.tool("shell_command_executor", command="echo one; read line; echo got $line", run_async=True)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["status"] == "shell still running, no return code"
    assert "one" in data["display"]
    sid = data["shell_id"]
    r = node.tool("shell_command_executor", command="two", shell_id=sid)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["ReturnCode"] == 0 and "got two" in r.json()["data"]["display"]
    r = node.tool("shell_command_executor", command="sleep 60", run_async=True)
    sid = r.json()["data"]["shell_id"]
    r = node.tool("shell_command_executor", shell_id=sid, kill=True, run_async=True)
    assert r.json()["data"]["status"] == "shell thread has been killed"
    r = node.tool("shell_command_executor", shell_id=sid)
    assert r.status_code == 500


def test_run_interpreter(node):
    r = node.tool("run_interpreter", code="import sys\nprint(6 * 7)\nprint('e', file=sys.stderr)")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data == {"ReturnCode": 0, "Error": "e\n", "Output": "42\n"}


# --- notebook ------------------------------------------------------------------------------------
def test_notebook_keeps_state(node):
    r = node.tool("PythonNotebook_execute_cell", code="x = 20\nprint('hi')\nx + 1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "composite"
    index = int(body["data"][0].split(": ")[1])
    assert body["data"][1:] == ["hi\n", "21"]
    r = node.tool("PythonNotebook_execute_cell", code="import os\nos.system('echo from-child')\nx * 2")
    assert r.json()["data"][1:] == ["from-child\n", "40"]
    r = node.tool("PythonNotebook_execute_cell", code="y = 1")
    assert r.json() == f"cell_index: {index + 2}"
    r = node.tool("PythonNotebook_execute_cell", code="x = 5", cell_index=index)
    assert r.json() == f"cell_index: {index}"
    r = node.tool("PythonNotebook_execute_cell", code="1 / 0")
    assert r.status_code == 500
    assert r.json()["detail"].startswith(f"cell_index: {index + 3}\n")
    assert "ZeroDivisionError" in r.json()["detail"]
    r = node.tool("PythonNotebook_print_notebook")
    assert r.status_code == 200
    assert f"= Cell {index} =\nx = 5\n" in r.json() and "ZeroDivisionError" in r.json()
    _code, out = node.sh("python3 -c \"import json;print(len(json.load(open('/app/workspace/python_notebook.ipynb'))['cells']))\"")
    assert int(out) == index + 4
    r = node.tool("PythonNotebook_execute_cell", code="x", reset=True)
    assert r.status_code == 500 and "NameError" in r.json()["detail"]


def test_notebook_timeout_interrupts(node):
    node.tool("PythonNotebook_execute_cell", code="kept = 'yes'")
    r = node.http.post("/execute_tool", timeout=10, json={  # a ReadTimeout means no interrupt
        "tool_name": "PythonNotebook_execute_cell", "arguments": {"code": "import time\nwhile True: time.sleep(0.1)"}})
    assert r.status_code == 500 and "Timeout" in r.json()["detail"]
    r = node.tool("PythonNotebook_execute_cell", code="kept")
    assert r.status_code == 200 and r.json()["data"][1] == "'yes'"


# --- web -------------------------------------------------------------------------------------------
def test_browse_website_fetches_a_page(node):
    # a page served inside the container (the node's own routes now want its secret)
    node.sh("mkdir -p /tmp/www && echo '<p>Hello World</p>' > /tmp/www/index.html && "
            "(setsid python3 -m http.server 8765 --bind 127.0.0.1 -d /tmp/www >/dev/null 2>&1 &) && "
            "for i in $(seq 50); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8765))' "
            "2>/dev/null && break; sleep 0.1; done")
    r = node.tool("WebEnv_browse_website", url="http://127.0.0.1:8765/", goals_to_browse="greeting")
    assert r.status_code == 200, r.text
    assert "Hello World" in r.json()
    r = node.tool("WebEnv_browse_website", url="ftp://example.invalid/", goals_to_browse="x")
    assert r.status_code == 500


# --- errors ----------------------------------------------------------------------------------------
def test_execute_tool_error_codes(node):
    assert node.tool("no_such_tool").status_code == 404
    assert node.tool("nope", env_name="FileSystemEnv").status_code == 404
    assert node.tool("read_from_file", env_name="NoEnv", filepath="x").status_code == 404
    r = node.tool("FileSystemEnv_read_from_file")  # missing required
    assert r.status_code == 422 and "filepath" in r.json()["detail"]
    r = node.tool("FileSystemEnv_read_from_file", filepath="x", line_number="ten")
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    r = node.tool("FileSystemEnv_read_from_file", filepath="x", bogus=1)
    assert r.status_code == 422
    for body in [b"{not json", b"[1, 2]", b'{"arguments": {}}', b'{"tool_name": 5}',
                 b'{"tool_name": "shell_command_executor", "arguments": [1]}']:
        r = node.post("/execute_tool", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, body
        assert isinstance(r.json()["detail"], str)
    for path, body in [("/download_file", {}), ("/get_json_schema_for_tools", {"tool_names": "x"}),
                       ("/get_json_schema_for_envs", {}), ("/register_new_tool", {"tool_name": "x"}),
                       ("/retrieving_tools", {"question": "x", "top_k": "many"})]:
        r = node.post(path, json=body)
        assert r.status_code == 422, path
    assert node.post("/upload_file", json={"file": "x"}).status_code == 422
    assert node.post("/upload_file", files={"other": ("a.txt", b"x")}).status_code == 422
    assert node.post("/download_file", json={"file_path": "does/not/exist.txt"}).status_code == 404
    r = node.http.get("/no/such/route")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_register_new_tool(node):
    code = (
        "@toolwrapper()\n"
        "def add_numbers(a: int, b: int = 2):\n"
        "    '''Add two integers.\n\n    :param integer a: first\n    :param integer? b: second\n    '''\n"
        "    return a + b\n"
    )
    r = node.post("/register_new_tool", json={"tool_name": "add_numbers", "code": code})
    assert r.status_code == 200, r.text
    tool = r.json()
    assert tool["name"] == "add_numbers"
    assert tool["parameters"]["required"] == ["a"]
    assert tool["parameters"]["properties"]["a"]["type"] == "integer"
    r = node.tool("add_numbers", a=40)
    assert r.status_code == 200 and r.json() == 42
    assert node.tool("add_numbers", a="x").status_code == 422
    r = node.post("/get_json_schema_for_tools", json={"tool_names": ["add_numbers"]})
    assert r.json()["missing_tools"] == []
    bad = [("broken", "def broken(:\n  pass"), ("missing", "def other(): pass"),
           ("add_numbers", code), ("boom", "raise SystemExit(1)"), ("not an id", "x = 1")]
    for name, src in bad:
        r = node.post("/register_new_tool", json={"tool_name": name, "code": src})
        assert r.status_code == 406, (name, r.text)
        assert isinstance(r.json()["detail"], str)
    r = node.post("/register_new_tool",
                  json={"tool_name": "fails", "code": "def fails():\n    raise RuntimeError('nope')"})
    assert r.status_code == 200
    r = node.tool("fails")
    assert r.status_code == 500 and "RuntimeError: nope" in r.json()["detail"]


# --- files over HTTP --------------------------------------------------------------------------------
def test_upload_download_10mb_identical(node):
    data = os.urandom(10 * 1024 * 1024)
    r = node.post("/upload_file", files={"file": ("big.bin", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Upload Success!"}
    r = node.post("/download_file", json={"file_path": "workspace/big.bin",
                                          "file_type": "application/octet-stream"})
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert "attachment" in r.headers["content-disposition"]
    assert 'filename="big.bin"' in r.headers["content-disposition"]
    _code, out = node.sh("ls -a /app/workspace | grep -c '^.upload-' || true")
    assert out.strip() == "0"
    # XAgent's client also sends a second file part named 'filename': only 'file' is stored
    r = node.post("/upload_file", files={"file": ("xagent.txt", b"from xagent"), "filename": "xagent.txt"})
    assert r.status_code == 200
    r = node.post("/download_file", json={"file_path": "xagent.txt"})
    assert r.content == b"from xagent" and r.headers["content-type"].startswith("text/plain")


def test_small_and_large_downloads_carry_the_same_headers(node):
    """A file up to 64 KiB is read on the loop, a larger one streamed: a client cannot tell them apart."""
    for name, size in (("small.bin", 65536), ("large.bin", 65537), ("empty.bin", 0)):
        data = os.urandom(size)
        assert node.post("/upload_file", files={"file": (name, data)}).status_code == 200
        r = node.post("/download_file", json={"file_path": name})
        assert r.status_code == 200 and r.content == data, name
        assert set(r.headers) == {"content-type", "content-length", "accept-ranges", "content-disposition",
                                  "last-modified", "etag", "date"}, (name, r.headers)
        assert r.headers["content-length"] == str(size) and r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert r.headers["content-type"] == "application/octet-stream"
        again = node.post("/download_file", json={"file_path": name, "file_type": "text/csv"})
        assert again.headers["etag"] == r.headers["etag"] and again.headers["content-type"].startswith("text/csv")
    # a FIFO in a file's place is never opened for a blocking read: the node answers at once
    node.tool("shell_command_executor", command="mkfifo /app/workspace/pipe")
    r = node.post("/download_file", json={"file_path": "pipe"})
    assert r.status_code == 404, r.text
    assert node.http.get("/").status_code == 200
    node.tool("shell_command_executor", command="rm -f pipe small.bin large.bin empty.bin")


def test_upload_is_streamed_to_disk(node):
    """A 64 MB upload must not be held in memory: the node's peak RSS stays far below it."""
    size = 64 * 1024 * 1024

    def body():
        chunk = b"\xab" * (1 << 20)
        for _ in range(size // len(chunk)):
            yield chunk

    import httpx

    boundary = "node-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"stream.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def gen():
        yield head
        yield from body()
        yield tail

    r = httpx.post(node.base + "/upload_file", content=gen(), timeout=60,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}", **node.auth})
    assert r.status_code == 200, r.text
    _code, out = node.sh("stat -c %s /app/workspace/stream.bin")
    assert int(out) == size
    _code, out = node.sh("grep VmHWM /proc/1/status")
    peak_kb = int(out.split()[1])
    print(f"node peak RSS after a 64 MB upload: {peak_kb / 1024:.1f} MB")
    assert peak_kb < 60 * 1024
    node.sh("rm -f /app/workspace/stream.bin")


def test_download_workspace_zip(node):
    node.tool("FileSystemEnv_write_to_file", filepath="zipdir/inner/z.txt", content="zipped")
    r = node.post("/download_workspace")
    assert r.status_code == 200
    assert 'filename="workspace.zip"' in r.headers["content-disposition"]
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert zf.testzip() is None
    assert zf.read("zipdir/inner/z.txt") == b"zipped\n"
    for _ in range(50):  # the temporary zip is removed once sent (in a background task)
        _code, out = node.sh("ls /tmp | grep -c '^workspace-.*zip$' || true")
        if out.strip() == "0":
            break
        time.sleep(0.05)
    assert out.strip() == "0"


def test_workspace_structure(node):
    node.tool("FileSystemEnv_write_to_file", filepath="tree/leaf.txt", content="x")
    r = node.post("/get_workspace_structure")
    assert r.status_code == 200
    root = r.json()
    assert root["name"] == "workspace" and root["type"] == "directory"
    tree = {c["name"]: c for c in root["children"]}
    assert tree["tree"]["type"] == "directory"
    assert tree["tree"]["children"] == [{"name": "leaf.txt", "type": "file"}]


# --- WebSockets -------------------------------------------------------------------------------------
def _recv_all(ws, timeout=10):
    from websockets.exceptions import ConnectionClosed

    frames = []
    try:
        while True:
            msg = json.loads(ws.recv(timeout=timeout))
            frames.append((time.monotonic(), msg))
    except ConnectionClosed as exc:
        return frames, exc.rcvd.code if exc.rcvd else None


def test_ws_shell_streams_lines(node):

    with node.ws("/ws/shell") as ws:
        # the command blocks after its first lines until the test lets it go on: lines that arrive
        # before then were streamed as produced, not sent at the end
        ws.send(json.dumps({"command": "echo first; echo oops >&2; while [ ! -f /tmp/go ]; do sleep 0.05; done;"
                                       " echo second; exit 7", "timeout": 30}))
        early = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
        node.sh("touch /tmp/go")
        frames, code = _recv_all(ws)
    assert sorted(early, key=str) == [{"type": "stderr", "line": "oops"}, {"type": "stdout", "line": "first"}]
    assert [m for _, m in frames] == [{"type": "stdout", "line": "second"}, {"type": "exit", "code": 7}]
    assert code == 1000


def test_ws_shell_timeout_and_bad_requests(node):

    with node.ws("/ws/shell") as ws:
        ws.send(json.dumps({"command": "echo x; sleep 20", "timeout": 1}))
        frames, code = _recv_all(ws)
    assert frames[-1][1]["type"] == "exit" and frames[-1][1].get("timed_out") is True
    assert code == 1000
    for payload, want in [("not json", 1008), (json.dumps({"cmd": "ls"}), 1008),
                          (json.dumps({"command": "ls", "timeout": "soon"}), 1008), (b"\x00binary", 1003)]:
        with node.ws("/ws/shell") as ws:
            ws.send(payload)
            frames, code = _recv_all(ws)
        assert frames and frames[0][1]["type"] == "error", payload
        assert code == want, payload


def test_ws_echo_and_close_code(node):

    with node.ws("/ws/echo") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        blob = os.urandom(70000)
        ws.send(blob)
        assert ws.recv(timeout=5) == blob
        ws.send("close:4001")
        from websockets.exceptions import ConnectionClosed

        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 4001


# --- lifecycle ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [False, True], ids=["python-pid1", "docker-init"])
def test_sigterm_stops_promptly(start_node, init):
    node = start_node(init=init)
    # leave work behind: a background shell, a request in flight and an open WebSocket command
    r = node.tool("shell_command_executor", command="sleep 300", run_async=True)
    assert r.status_code == 200
    inflight = threading.Thread(target=lambda: _swallow(node.tool, "PythonNotebook_execute_cell",
                                                        code="import time; time.sleep(300)"))
    inflight.start()

    with node.ws("/ws/shell") as ws:
        ws.send(json.dumps({"command": "sleep 300", "timeout": 600}))
        running = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null | grep -c '^sleep 300'"
        for _ in range(200):  # the background shell's and the WebSocket's
            if node.sh(running)[1].strip() == "2":
                break
            time.sleep(0.05)
        assert node.sh(running)[1].strip() == "2"
        t0 = time.monotonic()
        node.container.stop(timeout=5)
        took = time.monotonic() - t0
    node.container.reload()
    exit_code = node.container.attrs["State"]["ExitCode"]
    print(f"docker stop ({'init' if init else 'python as PID 1'}): {took:.2f} s, exit code {exit_code}")
    # the bound is docker's own stop timeout: a node that does not exit on SIGTERM is killed (137)
    assert exit_code != 137, "the node ignored SIGTERM and was killed"
    inflight.join(10)
    node.close()
    node.container.remove(force=True)


def test_an_idle_node_wakes_about_once_a_second(start_node):
    # uvicorn's own loop wakes ten times a second (its 0.1 s tick): 1.5 ms of CPU a second per idle
    # node, a sixth of a core for a pool of 100 idle nodes beside a burst; the node ticks once a
    # second. Counted as the server's sleeps (voluntary context switches), not as time
    node = start_node(healthcheck={"test": ["NONE"]})  # the image's check would wake it too
    pids = [int(p[1]) for p in node.container.top(ps_args="-eo comm,pid")["Processes"] if p[0].startswith("python")]
    assert len(pids) == 1, node.container.top()

    def sleeps() -> int:
        with open(f"/proc/{pids[0]}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))

    before, t0 = sleeps(), time.monotonic()
    time.sleep(5)
    per_second = (sleeps() - before) / (time.monotonic() - t0)
    print(f"an idle node's server woke {per_second:.1f} times a second")
    assert per_second < 4, f"the idle server woke {per_second:.1f} times a second (uvicorn's tick: 10)"
    r = node.post("/")  # and it still answers, with a Date header
    assert r.status_code == 200 and r.headers["date"]
    node.close()
    node.container.remove(force=True)


def _swallow(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except Exception:
        pass


def test_healthcheck_reports_healthy(node):
    deadline = time.monotonic() + 30  # the first check runs one interval (10 s) after start
    status = None
    while time.monotonic() < deadline:
        node.container.reload()
        status = node.container.attrs["State"].get("Health", {}).get("Status")
        if status == "healthy":
            break
        time.sleep(0.5)
    assert status == "healthy"


# --- the node's secret -----------------------------------------------------------------------------
ROUTES = [("GET", "/"), ("POST", "/"), ("POST", "/execute_tool"), ("POST", "/get_available_tools"),
          ("POST", "/upload_file"), ("POST", "/download_file"), ("POST", "/download_workspace"),
          ("POST", "/get_workspace_structure"), ("POST", "/register_new_tool"), ("POST", "/retrieving_tools"),
          ("POST", "/get_json_schema_for_tools"), ("POST", "/get_json_schema_for_envs"), ("GET", "/no_such_route")]


def test_every_route_refuses_a_request_without_the_secret(node):
    import httpx

    for headers in ({}, {"X-Node-Secret": "wrong"}, {"X-Node-Secret": ""}, {"X-Node-Secret": node.auth["X-Node-Secret"] + "x"}):
        for method, path in ROUTES:
            r = httpx.request(method, node.base + path, headers=headers, timeout=10,
                              json={"tool_name": "shell_command_executor", "arguments": {"command": "touch /app/workspace/pwned"}})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json() == {"detail": "missing or wrong node secret"}
    assert absent(node, "/app/workspace/pwned")
    assert node.http.post("/").status_code == 200  # with the secret


def test_websocket_handshake_without_the_secret_gets_401(node):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    for path in ("/ws/shell", "/ws/echo"):
        for headers in ({}, {"X-Node-Secret": "wrong"}):
            with pytest.raises(InvalidStatus) as err, \
                    connect(node.ws_base + path, additional_headers=headers, open_timeout=10):
                pass
            assert err.value.response.status_code == 401
    with node.ws("/ws/echo") as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"


def test_a_node_without_a_secret_refuses_everything(start_node):
    import httpx

    bare = start_node(environment={"NODE_SECRET": ""})
    for headers in ({}, {"X-Node-Secret": ""}, {"X-Node-Secret": "node-image-test-secret"}):
        assert httpx.get(bare.base + "/", headers=headers, timeout=10).status_code == 401


def test_tools_do_not_see_the_secret(node):
    r = node.tool("shell_command_executor", command="env; cat /proc/self/environ")
    assert r.status_code == 200
    assert node.auth["X-Node-Secret"] not in json.dumps(r.json())


def _running(node, marker: str) -> int:
    """How many processes of the node have marker in their command line."""
    _, out = node.sh(f"for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null | grep -c '{marker}' || true")
    return int(out.strip() or 0)


def test_what_a_call_started_ends_with_the_call(node):
    """A tool's process group is killed when its call ends: nothing it left in the background runs on."""
    r = node.tool("shell_command_executor", command="sleep 311 & sleep 312 </dev/null >/dev/null 2>&1 & echo started")
    assert r.status_code == 200 and "started" in r.json()["data"]["display"], r.text
    assert _running(node, "^sleep 31[12]") == 0
    r = node.tool("run_interpreter", code="import subprocess\nsubprocess.Popen(['sleep', '313'])\nprint('left')")
    assert r.status_code == 200 and "left" in r.json()["data"]["Output"], r.text
    assert _running(node, "^sleep 313") == 0
    with node.ws("/ws/shell") as ws:
        ws.send(json.dumps({"command": "sleep 314 & echo bg", "timeout": 30}))
        frames, _ = _recv_all(ws)
    assert {"type": "exit", "code": 0} in [m for _, m in frames]
    assert _running(node, "^sleep 314") == 0
    # an async shell keeps running between calls (XAgent's shell_id), and ends with its exit
    r = node.tool("shell_command_executor", command="sleep 315 & echo one", run_async=True)
    sid = r.json()["data"]["shell_id"]
    assert _running(node, "^sleep 315") == 1
    r = node.tool("shell_command_executor", command="exit 0", shell_id=sid, run_async=True)
    assert "exited" in r.json()["data"]["status"], r.text
    assert _running(node, "^sleep 315") == 0


# what config/manager.yml gives a node: no capability beyond these, no new privileges
HARDENED = {"cap_drop": ["ALL"], "cap_add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "KILL"],
            "security_opt": ["no-new-privileges"]}


@pytest.mark.parametrize("init", [False, True])
def test_tools_run_as_another_uid_than_the_server(start_node, init):
    """A tool can neither read the server's environment (its secret), nor signal nor trace it; files
    pass both ways in the workspace."""
    node = start_node(init=init, **HARDENED)
    _, server = node.sh("for p in /proc/[0-9]*; do grep -q 'app' $p/cmdline 2>/dev/null && "
                        "tr '\\0' ' ' < $p/cmdline | grep -q '^python3 -m app' && echo ${p#/proc/}; done")
    pid = server.split()[0]
    _, status = node.sh(f"grep -E '^(Uid|CapEff)' /proc/{pid}/status")
    assert "Uid:\t1001" in status, status
    r = node.tool("shell_command_executor", command=f"id -u; grep CapEff /proc/self/status; "
                  f"cat /proc/{pid}/environ; cat /proc/1/environ; kill -0 {pid} && echo signalled; "
                  f"grep -c . /proc/{pid}/maps || true; touch from-tool.txt; ls -ln", kill=True)
    assert r.status_code == 200, r.text
    display = r.json()["data"]["display"]
    assert display.split("stdout:\n")[1].startswith("1000\nCapEff:\t0000000000000000\n"), display
    assert node.auth["X-Node-Secret"] not in display and "signalled" not in display, display
    assert "Permission denied" in display and "Operation not permitted" in display, display
    # the server writes where tools wrote and the other way round
    r = node.tool("FileSystemEnv_write_to_file", filepath="from-tool.txt", content="server was here")
    assert r.status_code == 200, r.text
    r = node.tool("FileSystemEnv_write_to_file", filepath="d/from-server.txt", content="x")
    assert r.status_code == 200, r.text
    r = node.tool("shell_command_executor", command="cat from-tool.txt; echo more >> d/from-server.txt; "
                  "touch d/t && echo wrote")
    assert r.status_code == 200 and "server was here" in r.text and "wrote" in r.text, r.text


def test_root_without_the_capabilities_to_split_uids_is_refused(docker_client):
    """Never the server as root: started as root with no capability, the node says why and stops."""
    image = os.environ.get("TSM_NODE_IMAGE", "toolserver-node:latest")
    labels = {"toolserver-manager.manager_id": "test-node-image", "toolserver-manager.role": "test"}
    c = docker_client.containers.run(image, detach=True, labels=labels, user="0:0", cap_drop=["ALL"],
                                     environment={"NODE_SECRET": "x"}, security_opt=["no-new-privileges"])
    try:
        assert c.wait(timeout=30)["StatusCode"] == 1
        assert b"without the capabilities to split uids" in c.logs()
    finally:
        c.remove(force=True)
