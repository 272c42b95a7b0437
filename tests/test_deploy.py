"""Packaging and deployment files: the systemd unit (``systemd-analyze verify`` plus its
hardening), the Containerfile (no container builder here: checked structurally, as a linter
would), the distribution name and ``mypy --strict`` seeing the SDK's types through the editable
install."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tessera_mq.broker.cli import _parser as broker_parser

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "tessera-broker.service"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting in the unit."""
    section = ""
    out = []
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def test_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (apt-get install systemd; tests/run does)"
    here = shutil.which("tessera-broker", path=str(Path(sys.executable).parent))
    assert here, "tessera-broker is not installed next to the interpreter"
    # verify checks that ExecStart's program exists: point it at this environment's script.
    text = UNIT.read_text(encoding="utf-8").replace("/opt/tessera/bin/tessera-broker", here)
    copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-broker-{os.getpid()}.service"
    copy.write_text(text, encoding="utf-8")
    try:
        result = subprocess.run(
            [analyze, "verify", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        copy.unlink()
    # Unknown keys and bad values are only warnings for systemd: any output is a failure here.
    assert result.returncode == 0 and not result.stdout.strip(), result
    noise = [ln for ln in result.stderr.splitlines() if copy.name in ln or "ignoring" in ln]
    assert not noise, result.stderr


def test_systemd_unit_hardening_and_commands() -> None:
    service = {k: v for s, k, v in unit_entries() if s == "Service"}
    for key, value in HARDENING.items():
        assert service.get(key) == value, key
    assert service["User"] == "tessera" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 10  # above the default shutdown_timeout
    for key in ("ExecStartPre", "ExecStart"):
        argv = shlex.split(service[key])
        assert argv[0] == "/opt/tessera/bin/tessera-broker"
        args = broker_parser().parse_args(argv[1:])  # the commands the unit runs exist
        assert args.command in ("check-config", "serve")


def containerfile_instructions() -> list[tuple[str, str]]:
    text = CONTAINERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_containerfile_runs_as_non_root_and_builds_only_from_the_repository() -> None:
    instructions = containerfile_instructions()
    ops = [op for op, _ in instructions]
    assert "ADD" not in ops  # COPY only: nothing fetched from a URL at build time
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) == 2, "a build stage and a slim runtime stage"
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    for i in stages:
        image = instructions[i][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    final = instructions[stages[-1] :]
    users = [rest for op, rest in final if op == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users  # numeric: checkable by runAsNonRoot
    last_user = max(i for i, (op, _) in enumerate(final) if op == "USER")
    assert all(op != "RUN" for op, _ in final[last_user:]), "nothing runs as root after USER"
    for op, rest in instructions:
        if op == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), src
                assert not src.startswith((".venv", "tests", "tessera-dev")), src
    # The extras it installs exist; the entry point is the broker's console script.
    extras = args["EXTRAS"].split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    entrypoint = json.loads(dict(final)["ENTRYPOINT"])
    assert entrypoint == ["/opt/tessera/bin/tessera-broker"]
    assert PYPROJECT["project"]["scripts"]["tessera-broker"] == "tessera_mq.broker.cli:main"
    cmd = json.loads(dict(final)["CMD"])
    assert broker_parser().parse_args(cmd).command == "serve"
    assert "7443" in dict(final)["EXPOSE"].split()


# --- packaging ---------------------------------------------------------------------------------


def test_distribution_name_and_extras() -> None:
    project = PYPROJECT["project"]
    # "tessera" on the public index is an unrelated Graphite dashboard (docs/deploy.md).
    assert project["name"] == "tessera-mq"
    extras = project["optional-dependencies"]
    assert any(dep.startswith("prometheus_client") for dep in extras["metrics"])
    assert any(dep.startswith("prometheus_client") for dep in extras["test"])
    assert not any("prometheus" in dep for dep in project["dependencies"])  # core stays small
    setuptools = PYPROJECT["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    for package in setuptools["packages"]:
        # every installed module is under tessera_mq but the deprecated alias (docs/deploy.md)
        assert package.startswith("tessera_mq.") or package == "client_sdk", package
        if package.count(".") < 2:  # a subpackage is typed through its package's marker
            assert (REPO / folders[package] / "py.typed").is_file(), package


def test_mypy_strict_sees_the_sdk_types_through_the_editable_install(tmp_path: Path) -> None:
    """A user's project type-checks against the SDK from outside the repository, by its name
    and by the deprecated alias."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import client_sdk\n"
        "import tessera_mq.client as tessera\n\n"
        "async def main() -> None:\n"
        '    async with tessera.connect("tls://localhost:7443") as client:\n'
        "        reveal_type(client.publish)\n"
        '        await client.publish("a.b", b"x")\n'
        '    async with client_sdk.connect("tls://localhost:7443") as old:\n'
        "        reveal_type(old.publish)\n"
        "    error: tessera.TesseraError = client_sdk.ConnectionClosed()\n"
        "    print(error)\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         str(probe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    revealed = re.findall(
        r'Revealed type is "def \(topic: (?:builtins\.)?str, payload', result.stdout
    )
    assert len(revealed) == 2, result.stdout


def test_the_wheel_installs_what_docs_deploy_md_says(tmp_path: Path) -> None:
    """Build the wheel (pip, isolated build) and read what it would install. From a copy of
    the sources: setuptools builds in the source tree and would add a checkout's stale
    ``build/lib`` (e.g. modules of an earlier layout) to the wheel."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "tessera-dev"
        ),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith("tessera_mq-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert "\nName: tessera-mq\n" in meta
    assert {"Provides-Extra: metrics", "Provides-Extra: negotiate"} <= set(meta.splitlines())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"tessera_mq", "client_sdk"}  # the list in docs/deploy.md
    parts = {n.split("/")[1] for n in names if n.startswith("tessera_mq/")}
    assert parts == {"auth", "broker", "certs", "client"}
    assert "tessera_mq/__init__.py" not in names  # a namespace: the distribution's own
    assert "tessera_mq/client/protocol/codec.py" in names
    assert not any(n.startswith("tessera_mq/client/_compat") for n in names)
    typed = {f"tessera_mq/{p}/py.typed" for p in parts} | {"client_sdk/py.typed"}
    assert typed <= set(names)
    assert {"client_sdk/__init__.py", "client_sdk/__init__.pyi"} <= set(names)
    for script in (
        "tessera-broker = tessera_mq.broker.cli:main",
        "tessera = tessera_mq.client.cli:main",
        "tessera-certs = tessera_mq.certs.cli:main",
    ):
        assert script in scripts
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)


ALIAS_PROBE = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import client_sdk
import client_sdk.sync
from client_sdk.protocol.errors import TesseraError as OldError
import tessera_mq.client as tessera
import tessera_mq.client.sync
from tessera_mq.client.protocol.errors import TesseraError
assert [w.category for w in caught] == [DeprecationWarning], caught
assert "tessera_mq.client" in str(caught[0].message)
assert client_sdk is tessera and client_sdk.sync is tessera_mq.client.sync
assert OldError is TesseraError and client_sdk.connect is tessera.connect
assert client_sdk.Kerberos is tessera.Kerberos
print("alias ok", client_sdk.__name__)
"""


def test_the_old_sdk_name_is_a_deprecated_alias_of_the_same_module(tmp_path: Path) -> None:
    """``import client_sdk`` (the name before 0.2) keeps working, warns, and gives the same
    module objects, so code mixing the two names agrees on every class. Run outside the
    repository, where the folder ``client_sdk/`` is not importable as such."""
    result = subprocess.run(
        [sys.executable, "-c", ALIAS_PROBE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alias ok tessera_mq.client"
