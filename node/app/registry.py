"""The tool catalogue: XAgent-compatible names, JSON schemas, argument checking, lookup and retrieval.

Tool and env names, parameter names, types and required lists follow XAgent's ToolServerNode exactly
(``FileSystemEnv_print_filesys_struture`` keeps its typo), because XAgent's agent calls them by these
names. Implementations live in other modules and are imported on first use only.
"""

import math
import re

from .errors import NodeError


class Tool:
    __slots__ = (
        "_func",
        "accepts_extra",
        "description",
        "env",
        "hidden",
        "name",
        "properties",
        "required",
        "short",
        "target",
        "visible",
    )

    def __init__(self, name, description, properties=(), required=(), *, env=None, short=None,
                 visible=True, target=None, hidden=None, accepts_extra=False, func=None):
        self.name = name
        self.short = short or name
        self.env = env
        self.description = description
        # ordered (param name, {"type":..., "description":...}) pairs, as XAgent lists them
        self.properties = dict(properties)
        self.required = list(required)
        self.visible = visible
        self.target = target          # "module:function" inside this package, imported lazily
        self.hidden = dict(hidden or {})  # accepted arguments that XAgent's schema does not list
        self.accepts_extra = accepts_extra
        self._func = func

    def dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description[:1024],
            "parameters": {"type": "object", "properties": self.properties, "required": self.required},
        }

    def func(self):
        if self._func is None:
            import importlib

            module, attr = self.target.split(":")
            self._func = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        return self._func


class Env:
    __slots__ = ("description", "name", "tools")

    def __init__(self, name, description):
        self.name = name
        self.description = description
        self.tools = {}  # short name -> Tool

    def dict(self, include_invisible=False, max_show_tools=10) -> dict:
        names = [t.short for t in self.tools.values() if include_invisible or t.visible]
        if max_show_tools != -1 and len(names) > max_show_tools:
            names = [*names[:max_show_tools], "..."]
        return {"name": self.name, "description": self.description,
                "total_tools": len(self.tools), "tools": names}


def _p(type_, description):
    return {"type": type_, "description": description}


ENVS: dict = {}
TOOLS: dict = {}


def _add(tool: Tool) -> Tool:
    TOOLS[tool.name] = tool
    if tool.env is not None:
        ENVS[tool.env].tools[tool.short] = tool
    return tool


def _env_tool(env, short, description, properties=(), required=(), **kw):
    return _add(Tool(f"{env}_{short}", description, properties, required, env=env, short=short, **kw))


# --- FileSystemEnv ----------------------------------------------------------------------------
ENVS["FileSystemEnv"] = Env(
    "FileSystemEnv",
    "File system environment of the workspace: list, read, write and edit text files. "
    "Paths are relative to the workspace root and cannot leave it.",
)
_env_tool(
    "FileSystemEnv", "print_filesys_struture",
    "Show every folder and file of the workspace as an indented tree. Call it whenever you are not "
    "sure which files exist.\nFolders end with `/`; each level is indented by four spaces, e.g.\n"
    "```\n- workspace/\n    - src/\n        - main.py\n    - notes.txt\n```\n"
    "Very long folders are cut after 20 entries and marked `wrapped`.",
    target="filesystem:print_filesys_struture",
    hidden={"return_root": "boolean"},
)
_env_tool(
    "FileSystemEnv", "read_from_file",
    "Read a text file of the workspace and return its lines, each prefixed by its line number.\n"
    "No need to call this right after writing or modifying the file: those tools already return "
    "the new content.",
    [("filepath", _p("string", "Path of the file to read, relative to the workspace root.")),
     ("line_number", _p("integer", "First line to return (1-based; negative counts from the end). "
                                   "Defaults to 1."))],
    ["filepath"],
    target="filesystem:read_from_file",
)
_env_tool(
    "FileSystemEnv", "write_to_file",
    "Write text lines into a file of the workspace, creating it (and its folders) when missing, and "
    "return the file's new content with line numbers, so no extra read is needed.\n"
    "Examples:\n```\nwrite_to_file('a.txt', 'first\\nsecond')              -> appends two lines\n"
    "write_to_file('a.txt', 'inserted', line_number=2)  -> inserts before line 2\n"
    "write_to_file('a.txt', 'new 2', line_number=2, overwrite=True) -> replaces line 2\n```",
    [("filepath", _p("string", "Path of the file to write, relative to the workspace root.")),
     ("truncating", _p("boolean", "If true, empty the file before writing; otherwise keep its "
                                  "current content. Defaults to false.")),
     ("line_number", _p("integer", "Line at which the new content goes. Leave it out to append at "
                                   "the end of the file.")),
     ("overwrite", _p("boolean", "If true, the new lines replace the lines starting at "
                                 "`line_number`; otherwise they are inserted there. Defaults to false.")),
     ("content", _p("string", "The text to write."))],
    ["filepath", "content"],
    target="filesystem:write_to_file",
)
_env_tool(
    "FileSystemEnv", "modify_file",
    "Replace the slice [start_index:end_index] (0-based) of a text file's lines by `new_content` and "
    "return the new content with line numbers. Kept for older XAgent versions; prefer write_to_file.",
    [("filepath", _p("string", "Path of the file to modify, relative to the workspace root.")),
     ("new_content", _p("string", "The lines to put in place of the slice.")),
     ("start_index", _p("integer", "Start of the slice; leave it out to append at the end.")),
     ("end_index", _p("integer", "End of the slice; defaults to `start_index` (pure insertion)."))],
    ["filepath", "new_content"],
    target="filesystem:modify_file",
    visible=False,
)

# --- PythonNotebook ---------------------------------------------------------------------------
ENVS["PythonNotebook"] = Env(
    "PythonNotebook",
    "A Python notebook: cells run one after another in one persistent interpreter whose working "
    "directory is the workspace, so variables and imports survive between calls.",
)
_env_tool(
    "PythonNotebook", "execute_cell",
    "Append a new notebook cell (or replace the cell at `cell_index`), run it and return its output: "
    "printed text and the value of the last expression. Good for quickly trying an idea; check the "
    "output carefully.\nExamples:\n```\nexecute_cell(code='x = 21\\nx * 2')   -> ['cell_index: 0', '42']\n"
    "execute_cell(code='print(x)', cell_index=0) -> re-runs cell 0 with new code\n```",
    [("code", _p("string", "Python source to run. Plain Python only: no `!shell` or `%magic` lines.")),
     ("cell_index", _p("integer", "Index of the cell to replace (negative counts from the end). "
                                  "Leave it out to append a new cell.")),
     ("reset", _p("boolean", "If true, restart the interpreter (forgetting all variables) before "
                             "running. Defaults to false."))],
    ["code"],
    target="notebook:execute_cell",
)
_env_tool(
    "PythonNotebook", "print_notebook",
    "Return the source and the output of every cell of the notebook.",
    target="notebook:print_notebook",
)

# --- WebEnv -----------------------------------------------------------------------------------
ENVS["WebEnv"] = Env(
    "WebEnv",
    "Web access: search the web and read web pages. Some sites may be unreachable from the sandbox.",
)
_env_tool(
    "WebEnv", "search_and_browse",
    "Search the web and read the first results' pages. Some sites may be unreachable.",
    [("search_query", _p("string", "What to search for.")),
     ("goals_to_browse", _p("string", "What you want to learn from the pages found, e.g. 'What is the "
                                      "main idea of this article?'.")),
     ("region", _p("string", "Region code of the search such as `en-US` (the default), `zh-CN`, "
                             "`ja-JP`, `de-DE`, `fr-FR`, `en-GB`."))],
    ["search_query", "goals_to_browse"],
    target="web:search_and_browse",
    hidden={"num_results": "integer"},
)
_env_tool(
    "WebEnv", "browse_website",
    "Fetch an http(s) URL and return the page as plain text followed by its links. It only reads "
    "the page; it cannot click or fill forms. Some sites may be unreachable.",
    [("url", _p("string", "A real, complete URL such as 'https://www.example.com/'; never a "
                          "placeholder.")),
     ("goals_to_browse", _p("string", "What you want to find on the page."))],
    ["url", "goals_to_browse"],
    target="web:browse_website",
)

# --- plain tools ------------------------------------------------------------------------------
_add(Tool(
    "shell_command_executor",
    "Run a bash command in the workspace and return its exit code with its output (stdout and "
    "stderr). Use it to run programs, install packages, manage files, etc. A non-zero exit code is "
    "reported as a failure.\nSet run_async=True for long commands (servers, installs): the call "
    "returns after a few seconds with a `shell_id`; call again with that shell_id to send more "
    "input or read new output, and with kill=True to stop it.\nExamples:\n```\n"
    "shell_command_executor(command='echo hello')          -> {'ReturnCode': 0, 'display': ...}\n"
    "shell_command_executor(command='sleep 60', run_async=True) -> {'shell_id': 0, ...}\n"
    "shell_command_executor(shell_id=0, kill=True)         -> stops shell 0\n```",
    [("command", _p("string", "The command to run; it must not wait for interactive input. "
                              "Defaults to the empty string.")),
     ("run_async", _p("boolean", "Return after a few seconds while the command keeps running. "
                                 "Defaults to false.")),
     ("shell_id", _p("integer", "Id of a shell started earlier with run_async; leave it out to use a "
                                "new shell.")),
     ("kill", _p("boolean", "Kill the shell after this call. Defaults to false."))],
    [],
    target="shell:shell_command_executor",
))
_add(Tool(
    "run_interpreter",
    "Write `code` to `filename` in the workspace, then run `command` in bash and return its exit "
    "code and output.",
    [("code", _p("string", "Source to write into `filename`; leave it out to write nothing.")),
     ("command", _p("string", "Shell command to run; defaults to `python <filename>`.")),
     ("filename", _p("string", "File the code is written to; defaults to `code.py`."))],
    [],
    target="shell:run_interpreter",
    visible=False,
))


# --- queries ------------------------------------------------------------------------------------
def all_tool_names(include_invisible=False) -> list:
    return [n for n, t in TOOLS.items() if include_invisible or t.visible]


def all_tools_json(include_invisible=False) -> list:
    return [t.dict() for t in TOOLS.values() if include_invisible or t.visible]


def all_envs_json() -> list:
    return [e.dict() for e in ENVS.values()]


def lookup(tool_name: str, env_name=None) -> Tool:
    if env_name is not None:
        env = ENVS.get(env_name)
        if env is None:
            raise NodeError(404, f"The env {env_name} is not found!")
        tool = env.tools.get(tool_name)
        if tool is None and tool_name.startswith(env_name + "_"):
            tool = env.tools.get(tool_name[len(env_name) + 1:])
        if tool is None:
            raise NodeError(404, f"The tool {env_name}_{tool_name} is not found!")
        return tool
    tool = TOOLS.get(tool_name)
    if tool is None:
        raise NodeError(404, f"The tool {tool_name} is not found!")
    return tool


_TRUE = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(tool: Tool, name: str, type_, value):
    if value is None or type_ is None:
        return value
    bad = NodeError(422, f"Argument {name!r} of {tool.name} must be of type {type_}, "
                         f"got {type(value).__name__}")
    if type_ == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if type_ == "integer":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        raise bad
    if type_ == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if type_ == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE:
            return _TRUE[value.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if type_ == "array":
        if isinstance(value, list):
            return value
        raise bad
    if type_ == "object":
        if isinstance(value, dict):
            return value
        raise bad
    return value


def check_arguments(tool: Tool, arguments: dict) -> dict:
    """Validate and lightly coerce the arguments of a call; 422 on any mismatch."""
    out = {}
    for key, value in arguments.items():
        if key in tool.properties:
            type_ = tool.properties[key].get("type")
        elif key in tool.hidden:
            type_ = tool.hidden[key]
        elif tool.accepts_extra:
            out[key] = value
            continue
        else:
            allowed = ", ".join(list(tool.properties) + list(tool.hidden)) or "none"
            raise NodeError(422, f"Unexpected argument {key!r} for tool {tool.name} "
                                 f"(accepted: {allowed})")
        out[key] = _coerce(tool, key, type_, value)
    missing = [r for r in tool.required if out.get(r) is None]
    if missing:
        raise NodeError(422, f"Missing required argument(s) for tool {tool.name}: {', '.join(missing)}")
    return out


async def execute(tool: Tool, arguments: dict):
    import inspect

    kwargs = check_arguments(tool, arguments)
    # a null optional argument means "use the default", as a missing one does
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in tool.required}
    func = tool.func()
    if inspect.iscoroutinefunction(func):
        return await func(**kwargs)
    from starlette.concurrency import run_in_threadpool

    result = await run_in_threadpool(func, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


# --- retrieval: token overlap, weighted by rarity (no model, no network) ---------------------------
_STOP = set("a an and are as at be by can do for from get how i in into is it its me my of on or "  # noqa: SIM905
            "please some that the this to use using want what when which with you your".split())


def _stem(word: str) -> str:
    for suffix in ("ing", "ies", "es", "ed", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def _tokens(text: str) -> list:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text or "")
    return [_stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP]


def retrieve(question: str, top_k: int) -> list:
    docs = []
    for tool in TOOLS.values():
        name_tokens = set(_tokens(tool.name))
        body = tool.description + " " + " ".join(
            f"{k} {v.get('description', '')}" for k, v in tool.properties.items())
        env_desc = ENVS[tool.env].description if tool.env in ENVS else ""
        docs.append((tool.name, name_tokens, set(_tokens(body + " " + env_desc))))
    n = len(docs)
    query = set(_tokens(question))
    scored = []
    for name, name_tokens, body_tokens in docs:
        score = 0.0
        for tok in query:
            df = sum(1 for _, nt, bt in docs if tok in nt or tok in bt)
            if not df:
                continue
            idf = math.log(1 + n / df)
            if tok in name_tokens:
                score += 3 * idf
            elif tok in body_tokens:
                score += idf
        if score > 0:
            scored.append((-score, name))
    scored.sort()
    return [name for _, name in scored[:top_k]]


# --- tools registered at run time (/register_new_tool) --------------------------------------------
def toolwrapper(name=None, enabled=True, disabled_reason=None, parent_tools_visible=False, visible=True):
    """XAgent's decorator, accepted in registered code; it only records its options."""

    def decorate(obj):
        try:
            obj.__node_tool__ = {"name": name, "enabled": enabled, "visible": visible}
        except (AttributeError, TypeError):
            pass
        return obj

    return decorate


_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
             dict: "object", "str": "string", "int": "integer", "float": "number", "bool": "boolean",
             "list": "array", "dict": "object"}
_DOC_TYPES = {"string": "string", "str": "string", "integer": "integer", "int": "integer",
              "number": "number", "float": "number", "boolean": "boolean", "bool": "boolean",
              "array": "array", "list": "array", "object": "object", "dict": "object"}


def _parse_doc(doc: str):
    """Split a reST docstring (``:param type? name: text``) into description and parameters."""
    desc_lines, params = [], {}
    current = None
    for line in (doc or "").splitlines():
        m = re.match(r"\s*:param\s+(?:([\w\[\], ]+?)(\?)?\s+)?(\w+)\s*:\s*(.*)$", line)
        if m:
            type_, optional, pname, text = m.groups()
            params[pname] = {"type": _DOC_TYPES.get((type_ or "").strip().lower()),
                             "optional": bool(optional), "description": text.strip()}
            current = pname
        elif re.match(r"\s*:(returns?|rtype|raises?)\b", line):
            current = None
        elif current is not None and line.strip():
            params[current]["description"] += " " + line.strip()
        elif current is None and not params:
            desc_lines.append(line)
    import inspect

    return inspect.cleandoc("\n".join(desc_lines)).strip(), params


def register(tool_name: str, code: str) -> dict:
    import inspect
    import traceback

    if not tool_name.isidentifier():
        raise NodeError(406, f"Error happens when registering new tool:\n{tool_name!r} is not a valid "
                             "Python identifier")
    if tool_name in TOOLS:
        raise NodeError(406, f"Error happens when registering new tool:\nTool: {tool_name} is "
                             "replicated! Choose another name.")
    namespace = {"__name__": f"registered_tool_{tool_name}", "toolwrapper": toolwrapper}
    try:
        exec(compile(code, f"<tool {tool_name}>", "exec"), namespace)
    except BaseException as exc:  # SystemExit included: the code must not stop the node
        raise NodeError(406, f"Error happens when registering new tool:\nFailed to execute new tool "
                             f"code: {exc!r}\n\n{traceback.format_exc()}") from None
    func = namespace.get(tool_name)
    if func is None or not callable(func) or inspect.isclass(func):
        raise NodeError(406, f"Error happens when registering new tool:\nFailed to find a function "
                             f"named {tool_name} in the code, please verify the tool_name!")
    description, doc_params = _parse_doc(inspect.getdoc(func) or "")
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise NodeError(406, f"Error happens when registering new tool:\n{exc}") from None
    properties, required, accepts_extra = [], [], False
    for pname, param in sig.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            accepts_extra = True
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise NodeError(406, "Error happens when registering new tool:\npositional-only "
                                 f"parameter {pname!r} cannot be passed by name")
        info = doc_params.get(pname, {})
        type_ = info.get("type") or _PY_TYPES.get(param.annotation)
        prop = {"type": type_} if type_ else {}
        prop["description"] = info.get("description", "")
        properties.append((pname, prop))
        if param.default is param.empty and not info.get("optional"):
            required.append(pname)
    tool = Tool(tool_name, description, properties, required, func=func, accepts_extra=accepts_extra)
    TOOLS[tool_name] = tool
    return tool.dict()
