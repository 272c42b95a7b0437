"""docs/quickstart.md, run as written: every ```bash command in order (``.venv/bin/`` is this
environment's bin directory), every ```toml block written to the file its first comment names,
and the Python example. Brokers and subscribers run in the background as a reader would run them
in other terminals. Two substitutions keep the test off fixed ports: the dev broker gets
``--bind 127.0.0.1:0`` (its clients find it through the dev broker record, as documented) and the
production-shaped broker's port 7444 becomes a free one."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from brokerproc import REPO_ROOT, BrokerProcess

DOC = REPO_ROOT / "docs" / "quickstart.md"
BIN = Path(sys.executable).parent
DOC_PORT = "7444"
WAIT_SECONDS = 20.0


def blocks() -> list[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.DOTALL)


class Reader:
    """Runs the page's commands in ``workdir``."""

    def __init__(self, workdir: Path, env: dict[str, str], factory: Any) -> None:
        self.workdir = workdir
        self.env = env
        self.factory = factory
        self.port: int | None = None
        self.subscriber: subprocess.Popen[str] | None = None
        self.background: list[subprocess.Popen[str]] = []
        self.brokers: list[BrokerProcess] = []

    def expand(self, command: str) -> str:
        command = command.replace(".venv/bin/", f"{BIN}/")
        if self.port is not None:
            command = command.replace(f":{DOC_PORT}", f":{self.port}")
        return command

    def run_line(self, line: str) -> None:
        line = line.split("  #", 1)[0].strip()
        if not line:
            return
        if line.startswith("python3 -m venv"):
            # Step 1's install: this test runs in the installed environment; keep what follows.
            line = line.split("&&")[-1].strip()
        if "tessera-broker serve" in line:
            *before, serve = (part.strip() for part in line.split("&&"))
            for part in before:
                self.shell(part)
            self.serve(serve)
        elif re.search(r"/tessera sub ", line):
            self.subscribe(line)
        elif re.search(r"/tessera pub ", line) and self.subscriber is not None:
            self.publish_until_received(line)
        else:
            self.shell(line)

    def shell(self, command: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["bash", "-c", self.expand(command)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        if "|| echo" in command:  # the documented refusal happened, with its exit code
            assert "refused: 5" in result.stdout, (command, result.stdout, result.stderr)
        return result

    def serve(self, command: str) -> None:
        argv = shlex.split(command)
        assert Path(argv[0]).name == "tessera-broker", argv
        args = argv[1:]
        if "--dev" in args:
            args += ["--bind", "127.0.0.1:0"]
        else:
            config = self.workdir / args[args.index("--config") + 1]
            text = config.read_text(encoding="utf-8")
            config.write_text(text.replace(f":{DOC_PORT}", ":0"), encoding="utf-8")
        broker = BrokerProcess(args, workdir=self.workdir, env=self.env).start(WAIT_SECONDS)
        self.factory.track(broker)
        self.brokers.append(broker)
        if "--dev" not in args:
            self.port = broker.port

    def subscribe(self, command: str) -> None:
        argv = shlex.split(self.expand(command))
        argv[2:2] = ["-n", "1"]  # a reader would press Ctrl-C; the test takes one message
        self.subscriber = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.background.append(self.subscriber)

    def publish_until_received(self, command: str) -> None:
        """Publish (again) until the subscriber started before has its message (it subscribes
        asynchronously: the first publish may come before its subscription)."""
        sub = self.subscriber
        assert sub is not None
        topic, payload = shlex.split(command)[-2:]
        deadline = time.monotonic() + WAIT_SECONDS
        while sub.poll() is None:
            assert time.monotonic() < deadline, "the subscriber never received the message"
            self.shell(command)
            time.sleep(0.2)
        out, err = sub.communicate()
        assert sub.returncode == 0, err
        assert out.strip() == f"{topic} {payload}", (out, err)
        self.subscriber = None

    def run_python(self, code: str, publish: str) -> None:
        python = subprocess.Popen(
            [sys.executable, "-c", self.expand(code)],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.background.append(python)
        assert python.stdout is not None
        os.set_blocking(python.stdout.fileno(), False)
        deadline = time.monotonic() + WAIT_SECONDS
        seen = ""
        while "status.eu.node3 b'up'" not in seen:
            assert python.poll() is None, python.communicate()
            assert time.monotonic() < deadline, seen
            self.shell(publish)
            time.sleep(0.3)
            # The raw fd: a non-blocking text stream cannot say "nothing yet".
            with contextlib.suppress(BlockingIOError):
                seen += os.read(python.stdout.fileno(), 65536).decode("utf-8", "replace")

    def close(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def reader(tmp_path: Path, broker_factory: Any) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_RUNTIME_DIR", "run")):
        (tmp_path / sub).mkdir(mode=0o700)
        env[var] = str(tmp_path / sub)
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    r = Reader(workdir, env, broker_factory)
    try:
        yield r
    finally:
        r.close()


def test_the_quickstart_runs_as_written(reader: Reader) -> None:
    python_blocks = []
    for lang, body in blocks():
        if lang == "bash":
            for line in body.splitlines():
                reader.run_line(line)
        elif lang == "toml":
            first = body.splitlines()[0]
            m = re.match(r"# ([\w.-]+\.toml)\b", first)
            assert m, f"a toml block must name its file in its first line: {first!r}"
            (reader.workdir / m[1]).write_text(body, encoding="utf-8")
        elif lang == "python":
            python_blocks.append(body)
    assert reader.subscriber is None, "a subscriber was started but nothing was published"
    assert len(reader.brokers) == 2  # the dev broker and the production-shaped one
    assert (reader.workdir / "tessera-dev" / "ca.pem").is_file()
    (code,) = python_blocks
    reader.run_python(code, ".venv/bin/tessera pub status.eu.node3 up")  # the saved context
    for broker in reader.brokers:
        assert broker.stop() == 0, broker.describe()
