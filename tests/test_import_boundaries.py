"""Package boundaries (STYLE.md section 1), checked in fresh interpreters.

* ``client_sdk.protocol`` is pure: importing it pulls in no ``auth``, ``broker``, ``asyncio``,
  ``socket`` or ``ssl``;
* ``auth`` does not import ``client_sdk`` or ``broker``, nor ``asyncio`` or ``socket``; only
  ``auth.tls`` touches ``ssl`` (which itself imports ``socket``);
* the SDK (``client_sdk``) never imports the broker.

Each probe imports modules in a new interpreter and reports the modules that appeared plus, for
every ``import`` statement executed by one of our own modules, who imported what. Where a
third-party dependency legitimately pulls in ``socket`` (``cryptography.x509`` imports
``email.utils``), the rule is checked on our own import statements.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Our parts by their folder names (this file speaks of those); installed, each is under
#: ``tessera_mq`` (pyproject.toml [tool.setuptools.package-dir]): the probe translates.
OURS = ("auth", "broker", "certs", "client_sdk")
INSTALLED = {
    "auth": "tessera_mq.auth",
    "broker": "tessera_mq.broker",
    "certs": "tessera_mq.certs",
    "client_sdk": "tessera_mq.client",
}
WATCHED = ("asyncio", "socket", "ssl", *OURS)

_PROBE = r"""
import builtins, importlib, json, sys

installed = json.loads(sys.argv[1])  # folder name -> installed name
folder = {v: k for k, v in installed.items()}
watched = set(sys.argv[2].split(","))

def short(name):
    # tessera_mq.client.protocol -> client_sdk.protocol (None: not ours)
    for long_, short_ in folder.items():
        if name == long_ or name.startswith(long_ + "."):
            return short_ + name[len(long_):]
    return name if name.split(".")[0] != "tessera_mq" else None

def long(name):
    top, _, rest = name.partition(".")
    return installed[top] + ("." + rest if rest else "")

baseline = set(sys.modules)
edges = set()
real_import = builtins.__import__

def hook(name, globals=None, locals=None, fromlist=(), level=0):
    importer = short((globals or {}).get("__name__") or "?") or "?"
    if level == 0 and importer.split(".")[0] in installed:
        targets = [name] + [f"{name}.{f}" for f in fromlist or () if f != "*"]
        for target in targets:
            target = short(target)
            if target is not None and target.split(".")[0] in watched:
                edges.add((importer, target))
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = hook
for module in sys.argv[3:]:
    importlib.import_module(long(module))
builtins.__import__ = real_import
print(json.dumps({
    "baseline": sorted(baseline),
    "new": sorted(n for n in map(short, set(sys.modules) - baseline) if n is not None),
    "edges": sorted(edges),
}))
"""


@cache
def probe(*modules: str) -> dict[str, Any]:
    """Import ``modules`` in a fresh interpreter (cwd = repository root); see _PROBE."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(INSTALLED), ",".join(WATCHED), *modules],
        cwd=ROOT.parent,  # not the repository: its folders must not be importable by those names
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    baseline = {m.split(".")[0] for m in data["baseline"]}
    assert not baseline & set(WATCHED), f"the bare interpreter already imported {baseline}"
    return data


def tops(names: list[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def submodules(package: str) -> list[str]:
    path = ROOT.joinpath(*package.split("."))
    # _compat is client_sdk/_compat/, installed as the top-level alias `client_sdk`
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)]) if m.name != "_compat"]


def culprits(data: dict[str, Any], tops_: set[str]) -> list[tuple[str, str]]:
    """Which of our modules imported something under ``tops_`` (for assertion messages)."""
    return [(i, t) for i, t in data["edges"] if t.split(".")[0] in tops_]


# --- client_sdk.protocol ----------------------------------------------------------------------

PROTOCOL_MODULES = ["client_sdk.protocol", *submodules("client_sdk.protocol")]


def test_protocol_modules_import_only_the_protocol() -> None:
    # Every import statement in client_sdk/protocol/ names the protocol package itself (or a
    # module outside ours): never auth, broker, the SDK client, asyncio, socket or ssl.
    data = probe(*PROTOCOL_MODULES)
    bad = [
        (importer, target)
        for importer, target in data["edges"]
        if importer.startswith("client_sdk.protocol")
        and not target.startswith("client_sdk.protocol")
    ]
    assert bad == []


def test_importing_the_protocol_pulls_in_nothing_else() -> None:
    data = probe(*PROTOCOL_MODULES)
    new = set(data["new"])
    forbidden = {"auth", "broker", "asyncio", "socket", "ssl"}
    assert tops(data["new"]) & forbidden == set(), culprits(data, forbidden)
    assert {m for m in new if m.startswith("client_sdk.") and ".protocol" not in m} == set()


# --- auth ---------------------------------------------------------------------------------------

AUTH_MODULES = ["auth", *submodules("auth")]
#: Modules whose third-party dependencies import socket/ssl (ssl itself; cryptography.x509
#: via email.utils; pyspnego). Every other auth module must not pull either in at all.
#: (``auth.tls_release`` is the opt-in part of TLS, imported only by ``auth.tls``.)
AUTH_WITH_NETWORK_DEPENDENCIES = {"auth.tls", "auth.tls_release", "auth.negotiate"}


def test_auth_modules_include_the_core() -> None:
    assert {"auth.acl", "auth.identity", "auth.tls", "auth.errors", "auth.layer"} <= set(
        AUTH_MODULES
    )


def test_auth_imports_neither_the_sdk_nor_the_broker_nor_asyncio() -> None:
    data = probe(*AUTH_MODULES)
    forbidden = {"broker", "asyncio"}
    assert tops(data["new"]) & forbidden == set(), culprits(data, forbidden)
    # The one shared leaf: the topic/pattern/header grammar (issue #8). Nothing else of the
    # SDK, and so nothing that does I/O, is imported by auth.
    sdk = sorted(m for m in data["new"] if m.startswith("client_sdk."))
    assert "client_sdk.client" not in sdk and "client_sdk.link" not in sdk, sdk
    for importer, target in data["edges"]:
        if importer.startswith("auth") and target.startswith("client_sdk"):
            assert target.startswith("client_sdk.protocol.grammar"), (importer, target)


def test_auth_without_tls_imports_no_socket_or_ssl() -> None:
    data = probe(*(m for m in AUTH_MODULES if m not in AUTH_WITH_NETWORK_DEPENDENCIES))
    forbidden = {"socket", "ssl"}
    assert tops(data["new"]) & forbidden == set(), culprits(data, forbidden)


def test_only_auth_tls_touches_ssl_and_no_auth_module_imports_socket() -> None:
    data = probe(*AUTH_MODULES)
    assert ["auth.tls", "ssl"] in data["edges"]  # the probe does see import statements
    for importer, target in data["edges"]:
        if not importer.startswith("auth"):
            continue
        top = target.split(".")[0]
        assert top not in {"socket", "asyncio", "broker"}, (importer, target)
        if top == "ssl":
            assert importer in ("auth.tls", "auth.tls_release"), (importer, target)


# --- the SDK never imports the broker ---------------------------------------------------------


def test_sdk_does_not_import_the_broker() -> None:
    data = probe("client_sdk", *submodules("client_sdk"), *PROTOCOL_MODULES)
    assert "broker" not in tops(data["new"]), culprits(data, {"broker"})


# --- no cycle between broker modules (issue #8) -----------------------------------------------


def test_no_module_imports_the_folder_names() -> None:
    """Installed, the parts are ``tessera_mq.*``: an import of ``broker``, ``auth``, ``certs``
    or ``client_sdk`` would work from a checkout and fail (or import PyPI's unrelated
    ``auth``/``broker``/``certs``) for every user."""
    import ast  # noqa: PLC0415

    bad = []
    for folder in OURS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_compat" in path.parts:
                continue  # the deprecated alias package is the one place that names client_sdk
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                    for n in names
                    if n.split(".")[0] in OURS
                ]
    assert bad == []


def _broker_import_graph() -> dict[str, set[str]]:
    """``broker.X -> {broker.Y, ...}`` from every import statement in broker/*.py, including
    those under ``TYPE_CHECKING`` (a cycle there is still a design cycle)."""
    import ast  # noqa: PLC0415

    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "broker").glob("*.py")):
        name = "broker" if path.stem == "__init__" else f"broker.{path.stem}"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("tessera_mq.broker."):
                    targets.add(node.module.removeprefix("tessera_mq."))
            elif isinstance(node, ast.Import):
                targets |= {
                    a.name.removeprefix("tessera_mq.")
                    for a in node.names
                    if a.name.startswith("tessera_mq.broker.")
                }
        graph[name] = targets
    return graph


def test_no_import_cycle_between_broker_modules() -> None:
    graph = _broker_import_graph()
    assert graph["broker.hub"], "the probe sees the hub's imports"
    # The package __init__ re-exports; it is not part of the design's dependency order.
    graph.pop("broker", None)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt, [*stack, node])
        state[node] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [])


def test_connections_see_the_hub_through_a_narrow_interface() -> None:
    graph = _broker_import_graph()
    assert "broker.server" not in graph["broker.session"]
    assert "broker.server" not in graph["broker.handler"]
    assert "broker.hub" not in graph["broker.handler"]  # HubPort, a Protocol, not the Hub
