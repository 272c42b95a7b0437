"""What every harness in tests/fuzz/ shares: the engine, seeds, instrumentation and chunking.

Engine: atheris (libFuzzer, coverage-guided) when it is importable; otherwise, or with
``TESSERA_FUZZ_ENGINE=random``, a deterministic mutation driver that understands the same
command line (``-runs=N``, ``-max_total_time=S``, ``-seed=N``, ``-timeout=S``, ``-max_len=N``,
``-rss_limit_mb=N``, ``-artifact_prefix=P``, corpus directories, and files to replay). Either way
an exception escaping the target writes ``crash-<sha1>`` and the process exits non-zero, and
``python tests/fuzz/fuzz_x.py crash-<sha1>`` replays it.

Seeds: each harness builds valid inputs with the real codec and security layers at start-up.
They are written to ``$TMPDIR/tessera-fuzz/<harness>-<pid>/seeds/`` and given to libFuzzer as
the *last* corpus directory, so new inputs go to the first directory on the command line (your
corpus) and the seeds never pollute it; a dictionary of wire tokens (``-dict``) goes next to them.
The same per-process directory holds what a harness needs at start-up (certificates, a KDC);
directories of processes that are gone are removed at the next start (libFuzzer ends the process
with ``exit()``, so no Python clean-up runs).

See docs/fuzzing.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["ENGINE", "chunks", "instrumented", "main", "msgpack_tokens", "workdir"]

_ENGINE_ENV = "TESSERA_FUZZ_ENGINE"
_SEED_DIR_ENV = "TESSERA_FUZZ_SEED_DIR"

_atheris: Any
if os.environ.get(_ENGINE_ENV, "") == "random":
    _atheris = None
else:
    try:
        import atheris as _atheris
    except ImportError:
        if os.environ.get(_ENGINE_ENV, "") == "atheris":
            raise
        _atheris = None

#: "atheris" (coverage-guided libFuzzer) or "random" (the fallback mutation driver).
ENGINE = "atheris" if _atheris is not None else "random"

TestOneInput = Callable[[bytes], None]


def instrumented(*packages: str) -> contextlib.AbstractContextManager[Any]:
    """Import the code under test inside this block so atheris can trace its branches."""
    if _atheris is None:
        return contextlib.nullcontext()
    return _atheris.instrument_imports(include=list(packages))  # type: ignore[no-any-return]


def chunks(stream: bytes, selector: int) -> Iterator[bytes]:
    """Cut ``stream`` into reads, as a socket would, the cut being chosen by ``selector`` (a byte
    of the fuzz input): 0 whole, 1 byte by byte, otherwise pseudo-random sizes up to
    ``2**(selector % 13)`` bytes from a generator seeded with ``selector``. Never yields b""."""
    if not stream:
        return
    if selector == 0:
        yield stream
        return
    if selector == 1:
        for i in range(len(stream)):
            yield stream[i : i + 1]
        return
    rng = random.Random(selector)
    top = 1 << (selector % 13)
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, top)
        yield stream[pos : pos + n]
        pos += n


# --- the per-process directory, seeds and dictionary ---------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def workdir(name: str) -> Path:
    """This process's scratch directory for harness ``name`` (made once; see the module doc)."""
    root = Path(tempfile.gettempdir()) / "tessera-fuzz"
    root.mkdir(exist_ok=True)
    directory = root / f"{name}-{os.getpid()}"
    if not directory.exists():
        for old in root.iterdir():  # directories of runs that have ended
            _, _, pid = old.name.rpartition("-")
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        directory.mkdir(mode=0o700)
    return directory


def msgpack_tokens(*words: str) -> list[bytes]:
    """Dictionary entries: each word as a msgpack str, as it appears in a frame body."""
    out = []
    for word in words:
        raw = word.encode()
        head = bytes([0xA0 | len(raw)]) if len(raw) < 32 else bytes([0xD9, len(raw)])
        out.append(head + raw)
    return out


def _write_seeds(name: str, seeds: Iterable[bytes]) -> Path:
    directory = workdir(name) / "seeds"
    directory.mkdir(exist_ok=True)
    for seed in seeds:
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return directory


def _write_dict(name: str, tokens: Iterable[bytes]) -> Path:
    path = workdir(name) / "tokens.dict"
    lines = ['"' + "".join(f"\\x{b:02x}" for b in token) + '"' for token in tokens]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


# --- entry point ---------------------------------------------------------------------------------


def main(
    name: str,
    test_one_input: TestOneInput,
    seeds: Callable[[], Iterable[bytes]],
    *,
    dictionary: Iterable[bytes] = (),
    default_args: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> None:
    """Run the harness ``name`` with the command line ``argv`` (libFuzzer syntax). Never
    returns: exits 0 when the run budget is spent, non-zero on a crash, a hang or an OOM."""
    args = list(sys.argv if argv is None else argv)
    given = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    args[1:1] = [a for a in default_args if a.split("=", 1)[0] not in given]
    replay = any(not a.startswith("-") and Path(a).is_file() for a in args[1:])
    seed_list = [] if replay else list(seeds())
    print(f"tessera-fuzz: {name}: engine {ENGINE}, {len(seed_list)} seeds", file=sys.stderr)
    # A quick self-check: every seed must pass, or the harness itself is broken.
    for seed in seed_list:
        test_one_input(seed)
    tokens = list(dictionary)
    if _atheris is None:
        sys.exit(_random_engine(test_one_input, seed_list, args, tokens))
    # Processes started by libFuzzer's -fork/-jobs/-merge get their inputs from the parent.
    if seed_list and not os.environ.get(_SEED_DIR_ENV):
        seed_dir = str(_write_seeds(name, seed_list))
        os.environ[_SEED_DIR_ENV] = seed_dir
        args.append(seed_dir)
    if tokens and "-dict" not in given and not replay:
        args.insert(1, f"-dict={_write_dict(name, tokens)}")
    # libFuzzer's -fork, -jobs, -merge and -minimize_crash re-run args[0] through the shell:
    # make that "python harness.py", not the script itself (which need not be executable).
    args[0] = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(args[0]).resolve()))}"
    _atheris.Setup(args, test_one_input)
    _atheris.Fuzz()


# --- the fallback engine -------------------------------------------------------------------------


class _Timeout(BaseException):  # BaseException: the target's own `except Exception` lets it by
    pass


_INTERESTING = (
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x00\x01\x00\x00",
    b"\x00\x00\x00\x01",
    b"\x7f\xff\xff\xff",
    b"\x00\x00\xff\xff",
    b"\x80",
    b"\xc0",
    b"\xdf\xff\xff\xff\xff",
    b"\xdd\xff\xff\xff\xff",
    b"\xc6\x00\x01\x00\x00",
)


def _mutate(
    rng: random.Random,
    data: bytes,
    corpus: Sequence[bytes],
    tokens: Sequence[bytes],
    max_len: int,
) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:  # delete a range
            end = min(len(buf), pos + rng.randint(1, 32))
            del buf[pos:end]
        elif op == 4 and buf:  # duplicate a range
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 64)]
        elif op == 5:  # overwrite with an interesting integer, msgpack header or token
            value = (
                rng.choice(tokens) if tokens and rng.random() < 0.5 else rng.choice(_INTERESTING)
            )
            buf[pos : pos + len(value)] = value
        elif op == 6 and corpus:  # splice with another input
            other = rng.choice(corpus)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 7 and buf:  # truncate
            del buf[pos:]
    return bytes(buf[:max_len])


def _options(args: Sequence[str]) -> tuple[dict[str, str], list[Path]]:
    opts: dict[str, str] = {}
    paths: list[Path] = []
    for a in args[1:]:
        if a.startswith("-"):
            key, _, value = a.lstrip("-").partition("=")
            opts[key] = value
        else:
            paths.append(Path(a))
    return opts, paths


def _random_engine(
    target: TestOneInput, seeds: list[bytes], args: Sequence[str], tokens: list[bytes]
) -> int:
    opts, paths = _options(args)
    prefix = opts.get("artifact_prefix", "./")
    timeout = float(opts.get("timeout", "1200"))
    rss_limit = int(opts.get("rss_limit_mb", "2048"))
    max_len = int(opts.get("max_len", "4096"))
    runs = int(opts.get("runs", "-1"))
    max_time = float(opts.get("max_total_time", "0"))
    seed = int(opts.get("seed", "0")) or int.from_bytes(os.urandom(4), "big")

    def on_alarm(_sig: int, _frame: FrameType | None) -> None:
        raise _Timeout

    signal.signal(signal.SIGALRM, on_alarm)

    def run(data: bytes) -> bool:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            target(data)
        except _Timeout:
            return _report(data, prefix, "timeout", f"an input ran longer than {timeout:g} s")
        except BaseException:
            return _report(data, prefix, "crash", traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return True

    files = [p for p in paths if p.is_file()]
    if files:  # replay mode, as libFuzzer: run each file once
        for path in files:
            print(f"Running: {path}", file=sys.stderr)
            if not run(path.read_bytes()):
                return 1
            print(f"Executed {path}", file=sys.stderr)
        return 0

    corpus = list(seeds)
    for directory in paths:
        if directory.is_dir():
            corpus += [p.read_bytes()[:max_len] for p in sorted(directory.iterdir()) if p.is_file()]
    corpus = corpus or [b""]
    rng = random.Random(seed)
    print(f"INFO: random engine, seed: {seed}, corpus: {len(corpus)} inputs", file=sys.stderr)
    started = time.monotonic()
    done = 0
    for data in corpus:
        if not run(data):
            return 1
        done += 1
    next_status = 1
    while (runs < 0 or done < runs) and (max_time <= 0 or time.monotonic() - started < max_time):
        if runs < 0 and max_time <= 0 and done >= 1_000_000:
            break
        data = _mutate(rng, rng.choice(corpus), corpus, tokens, max_len)
        if not run(data):
            return 1
        done += 1
        if rng.random() < 0.01 and len(corpus) < 10_000:
            corpus.append(data)  # drift: no coverage feedback, but mutations compound
        if done >= next_status:
            next_status *= 2
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"#{done}\tpulse corp: {len(corpus)} rss: {rss_mb}Mb", file=sys.stderr)
            if rss_mb > rss_limit:
                return int(not _report(data, prefix, "oom", f"rss {rss_mb} MB > {rss_limit} MB"))
    elapsed = time.monotonic() - started
    print(f"Done {done} runs in {elapsed:.0f} second(s)", file=sys.stderr)
    return 0


def _report(data: bytes, prefix: str, kind: str, detail: str) -> bool:
    path = f"{prefix}{kind}-{hashlib.sha1(data).hexdigest()}"
    with contextlib.suppress(OSError):
        Path(path).write_bytes(data)
    print(detail, file=sys.stderr)
    print(f"==ERROR: {kind} (random engine); input of {len(data)} bytes", file=sys.stderr)
    print(f"artifact_prefix='{prefix}'; Test unit written to {path}", file=sys.stderr)
    return False
