"""The security code uses only public interfaces of pyspnego and python-gssapi, and changes
nothing process-wide: no private names imported, no private attributes poked, no library class
patched, no environment variable written unless NTLM is enabled (docs/kerberos.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The SPNEGO modules (auth/tls.py, owned elsewhere, reads ssl's ._sslobj for its own reasons).
SCANNED = [ROOT / "auth" / name for name in ("negotiate.py", "credentials.py", "stack.py")]
# The pokes the issue found, by name: private attributes and keyword arguments of pyspnego.
KNOWN_POKES = ("_is_wrapped", "_negotiate_contexts", "_gssapi_credential", "_context")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    modules: set[str] = set()  # names bound to imported third-party modules or their members

    def where(node: ast.AST) -> str:
        return f"{path.name}:{getattr(node, 'lineno', '?')}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"{where(node)}: import {alias.name}")
                if not alias.name.startswith("auth"):
                    modules.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "auth":
                continue
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{where(node)}: from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{where(node)}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            own = isinstance(base, ast.Name) and base.id in {"self", "cls"}
            if not own:
                found.append(f"{where(node)}: private attribute .{node.attr}")
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                root = _root(target) if isinstance(target, ast.Attribute) else None
                if isinstance(root, ast.Name) and root.id in modules:
                    found.append(f"{where(node)}: assignment to {root.id}.* (a library patch)")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"setattr", "delattr"}
        ):
            found.append(f"{where(node)}: {node.func.id}()")
        if isinstance(node, ast.keyword) and node.arg and _private(node.arg):
            found.append(f"{where(node)}: private keyword argument {node.arg}=")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if (
                "spnego._" in text
                or "gssapi.raw._" in text
                or any(f"{p}=" in text or f".{p}" in text for p in KNOWN_POKES)
            ):
                found.append(f"{where(node)}: string names a private library attribute")
    return found


def test_scanner_catches_the_old_pokes(tmp_path: Path) -> None:
    """The scanner itself: every construct of the old auth/negotiate.py is reported."""
    sample = tmp_path / "old.py"
    sample.write_text(
        "import gssapi\n"
        "from spnego._gss import GSSAPIProxy\n"
        "from spnego import _spnego\n"
        "import spnego._ntlm_raw.messages\n"
        "gssapi.SecurityContext.__DEFER_STEP_ERRORS__ = False\n"
        "inner = GSSAPIProxy(_gssapi_credential=None)\n"
        "inner._is_wrapped = True\n"
        "ctx = inner._context\n"
        "setattr(inner, 'x', 1)\n"
    )
    found = violations(sample)
    assert sorted({int(f.split(":")[1]) for f in found}) == list(range(2, 10)), found


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.name)
def test_no_private_library_names_or_patches(path: Path) -> None:
    assert violations(path) == []


def test_importing_and_using_the_layers_changes_nothing_process_wide(tmp_path: Path) -> None:
    """In a fresh interpreter: gssapi's classes keep their defaults and os.environ is untouched
    by importing auth.negotiate and building Kerberos layers."""
    keytab = tmp_path / "empty.keytab"
    keytab.write_bytes(b"\x05\x02")  # an empty keytab: only its existence is checked here
    code = f"""
import json, os, sys
import gssapi
before_env = dict(os.environ)
before_defer = getattr(gssapi.SecurityContext, "__DEFER_STEP_ERRORS__", None)
import tessera_mq.auth.negotiate as n, tessera_mq.auth.stack
n.NegotiateServerLayer("tessera/h.test", {str(keytab)!r})
n.NegotiateClientLayer("h.test")
print(json.dumps({{
    "env_changed": sorted(k for k in set(os.environ) | set(before_env)
                          if os.environ.get(k) != before_env.get(k)),
    "defer_before": before_defer,
    "defer_after": getattr(gssapi.SecurityContext, "__DEFER_STEP_ERRORS__", None),
}}))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["env_changed"] == []
    assert result["defer_after"] == result["defer_before"]


def test_pyspnego_has_no_upper_pin() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith("negotiate = "))
    assert "pyspnego" in line and "<" not in line.split("#")[0]
