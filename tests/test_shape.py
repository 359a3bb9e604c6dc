"""The shape of canhazgpu.py, which a reader relies on: its sections in dependency
order, no definition that names one of a later section, short functions, a contract
on every Lua script, and comments that a user who copied the file can follow."""

import ast
import re

from conftest import PROGRAM

SECTIONS = [
    "Errors, messages and identity",
    "Time and durations",
    "Configuration",
    "Redis state and Lua scripts",
    "GPU providers",
    "Allocation and queue",
    "Supervisor",
    "Commands",
    "Web",
    "Entry point",
    "Data",
]
# Templates and constants sit last, as bottle.py keeps them: named from anywhere.
DATA = "Data"
LONG_ALLOWED = {"command_table"}  # the parser table: data more than code
MAX_LINES = 60

SOURCE = PROGRAM.read_text()
TREE = ast.parse(SOURCE)


def sections():
    """[(title, first line)] of the `# ===` headed sections."""
    lines = SOURCE.splitlines()
    found = []
    for k in range(len(lines) - 2):
        if re.fullmatch(r"# =+", lines[k]) and re.fullmatch(r"# =+", lines[k + 2]):
            found.append((lines[k + 1][2:], k + 1))
    return found


def section_of(line, heads):
    title = None
    for name, first in heads:
        if first <= line:
            title = name
    return title


def definitions():
    """{top-level name: section} of every function, class and constant."""
    heads = sections()
    out = {}
    for node in TREE.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        for name in names:
            out[name] = section_of(node.lineno, heads)
    return out


def test_the_sections_come_in_dependency_order():
    assert [title for title, _ in sections()] == SECTIONS


def test_no_definition_names_one_of_a_later_section():
    where = definitions()
    heads = sections()
    order = {title: k for k, title in enumerate(SECTIONS)}
    upward = []
    for node in TREE.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        here = section_of(node.lineno, heads)
        # A name the definition binds itself (a local variable, an argument) is its own.
        local = {
            n.id
            for n in ast.walk(node)
            if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
        }
        local |= {
            a.arg
            for n in ast.walk(node)
            if isinstance(n, ast.arguments)
            for a in (*n.posonlyargs, *n.args, *n.kwonlyargs, n.vararg, n.kwarg)
            if a
        }
        for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - local:
            there = where.get(name)
            if there and there != DATA and order[there] > order[here]:
                upward.append(f"{node.name} ({here}) names {name} ({there})")
    assert upward == []


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(TREE)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name not in LONG_ALLOWED
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert long == []


def test_every_lua_script_states_its_contract():
    lines = SOURCE.splitlines()
    missing = []
    for node in TREE.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id.startswith("LUA_"):
            comment = []
            k = node.lineno - 2
            while k >= 0 and lines[k].startswith("#"):
                comment.insert(0, lines[k])
                k -= 1
            text = "\n".join(comment)
            needed = (
                ["KEYS:", "ARGV[1]:", "reply:", "errors:"]
                if node.targets[0].id == "LUA_LIB"
                else ["A:", "reply:"]
            )
            if not all(word in text for word in needed):
                missing.append(node.targets[0].id)
    assert missing == []


def test_comments_need_nothing_outside_the_repository():
    assert not re.search(r"rule [0-9]|SPEC|shared/", SOURCE)


def test_the_module_docstring_says_what_each_section_owns():
    doc = ast.get_docstring(TREE)
    for title in SECTIONS:
        assert title.split(",")[0].split(" and ")[0].lower() in doc.lower(), title
