"""`_core.pyi` describes exactly what the Rust extension registers: every public name, each
function's and method's parameters (names, kinds, defaults), each class's methods and properties.
Stubs that drift from rust/ mislead every type checker and reader of the API."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore import _core

STUB = Path(clawstore.__file__).with_name("_core.pyi")
_KINDS = {
    "posonly": inspect.Parameter.POSITIONAL_ONLY,
    "args": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "kwonly": inspect.Parameter.KEYWORD_ONLY,
}


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text())


def _stub_params(fn: ast.FunctionDef, *, method: bool) -> list[tuple[str, Any, Any]]:
    a = fn.args
    out: list[tuple[str, Any, Any]] = []
    positional = [*a.posonlyargs, *a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = _KINDS["posonly"] if i < len(a.posonlyargs) else _KINDS["args"]
        value = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        out.append((arg.arg, kind, value))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        value = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        out.append((arg.arg, _KINDS["kwonly"], value))
    if method:
        out = out[1:]  # self
    return out


def _runtime_params(obj: Any, *, method: bool) -> list[tuple[str, Any, Any]]:
    params = list(inspect.signature(obj).parameters.values())
    if method and params and params[0].name in ("self", "slf"):
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


def _same(stub: list[tuple[str, Any, Any]], runtime: list[tuple[str, Any, Any]]) -> bool:
    """Equal, except that PyO3 renders defaults it cannot spell (such as -1) as `...`."""
    if len(stub) != len(runtime):
        return False
    return all(
        s[:2] == r[:2] and (s[2] == r[2] or (r[2] is Ellipsis and s[2] is not inspect.Parameter.empty))
        for s, r in zip(stub, runtime, strict=True)
    )


def _stub_names(tree: ast.Module) -> dict[str, ast.stmt]:
    names: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        # plain `X = ...` assignments are type aliases of the stub, not runtime names
    return names


def test_every_registered_name_has_a_stub_and_every_stub_exists() -> None:
    stubbed = set(_stub_names(_stub_tree()))
    runtime = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert runtime - stubbed == set(), "registered in rust/ but missing from _core.pyi"
    assert stubbed - runtime == set(), "in _core.pyi but not registered by rust/"


def _functions() -> list[str]:
    return [n for n, s in _stub_names(_stub_tree()).items() if isinstance(s, ast.FunctionDef)]


def _classes() -> list[str]:
    names = _stub_names(_stub_tree())
    return [n for n, s in names.items() if isinstance(s, ast.ClassDef) and not n.endswith("Error")]


@pytest.mark.parametrize("name", _functions())
def test_function_signatures_match(name: str) -> None:
    node = _stub_names(_stub_tree())[name]
    assert isinstance(node, ast.FunctionDef)
    stub, runtime = _stub_params(node, method=False), _runtime_params(getattr(_core, name), method=False)
    assert _same(stub, runtime), (stub, runtime)


@pytest.mark.parametrize("name", _classes())
def test_class_members_and_signatures_match(name: str) -> None:
    node = _stub_names(_stub_tree())[name]
    assert isinstance(node, ast.ClassDef)
    cls = getattr(_core, name)
    stub_methods: dict[str, ast.FunctionDef] = {}
    stub_props: set[str] = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                stub_props.add(item.name)
            else:
                stub_methods[item.name] = item
    runtime_props = {n for n, v in vars(cls).items() if inspect.isdatadescriptor(v) and not n.startswith("_")}
    runtime_methods = {
        n for n, v in vars(cls).items() if callable(v) and (not n.startswith("_") or n in _DUNDERS)
    }
    assert stub_props == runtime_props
    init = stub_methods.pop("__init__", None)
    assert set(stub_methods) == runtime_methods
    if init is not None:
        stub, runtime = _stub_params(init, method=True), _runtime_params(cls, method=False)
        assert _same(stub, runtime), (stub, runtime)
    else:  # no constructor in the stub: Python code cannot create one either
        with pytest.raises(TypeError):
            cls()
    for m, fn in stub_methods.items():
        if m in ("__enter__", "__exit__", "__len__"):
            continue  # slot wrappers carry no parameter names
        stub, runtime = _stub_params(fn, method=True), _runtime_params(getattr(cls, m), method=True)
        assert _same(stub, runtime), (m, stub, runtime)


_DUNDERS = {"__len__", "__enter__", "__exit__"}
