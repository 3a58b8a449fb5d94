"""`clawstore log ...` and `clawstore cache ...` as a script would use them: stdout, stderr,
exit statuses (restore: 0 hit, 3 partial, 4 miss), one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import clawstore
from clawstore import logs
from test_cli import assert_error, cs, run, url  # noqa: F401 (fixtures)


def test_log_append_cat_tail_verify_ls(cs, url: str) -> None:  # noqa: F811
    data = b"".join(b"line %d\n" % i for i in range(5000))
    r = cs("log", "append", "logs/s1:out", "--segment-size", "4096", input=data)
    assert r.code == 0, r.err
    assert r.text.strip().startswith("sha256:")
    assert cs("log", "cat", "logs/s1:out").out == data
    assert cs("log", "cat", "logs/s1:out", "--tail", "2").out == b"line 4998\nline 4999\n"
    assert cs("log", "cat", "logs/s1:out", "--since", "1h").out == data
    assert cs("log", "cat", "logs/s1:out", "--until", "2001-01-01T00:00:00").out == b""
    assert cs("log", "cat", "logs/s1:out", "--since", "@0", "--until", "@1").out == b""
    assert cs("log", "follow", "logs/s1:out").out == data  # closed: prints all and ends
    v = cs("log", "verify", "logs/s1:out")
    assert v.code == 0 and v.text.startswith("ok: ")
    assert "logs/s1:out  closed" in cs("log", "ls").text


def test_log_verify_names_the_bad_segment(cs, url: str) -> None:  # noqa: F811
    cs("log", "append", "logs/s2:out", "--segment-size", "100", input=b"x" * 1000)
    store = clawstore.open(url)
    seg = logs.load(store, "logs/s2:out").segments[4]
    path = store.blob_local_path(seg.descriptor.digest)
    assert path is not None
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    r = cs("log", "verify", "logs/s2:out")
    assert r.code == 1
    assert r.text.startswith("bad segment 4: ")
    assert_error(cs("log", "cat", "logs/s2:out"), "segment 4")


def test_log_errors_are_one_line(cs) -> None:  # noqa: F811
    cs("blob", "put", "-", input=b"x")
    assert_error(cs("log", "cat", "logs/none:x"), "not found")
    assert_error(cs("log", "cat", "Bad:ref"), "invalid repository")
    assert cs("log", "cat", "logs/x:y", "--since", "yesterday-ish").code == 2


def test_log_append_refused_while_another_writer_holds_it(cs, url: str) -> None:  # noqa: F811
    w = logs.LogWriter(clawstore.open(url), "logs/held:out", max_age=None)
    assert_error(cs("log", "append", "logs/held:out", input=b"x\n"), "held by writer")
    w.close()


def test_log_append_streams_from_a_pipe(tmp_path: Path) -> None:
    """The console script end to end: a slow producer's lines are sealed by age and readable
    while it runs; the log closes at end of input."""
    store_url = (tmp_path / "store").as_uri()
    producer = "import sys,time\nfor i in range(5):\n    print(i, flush=True); time.sleep(0.1)\n"
    cmd = (
        f"{sys.executable} -c '{producer}' | {sys.executable} -m clawstore --store {store_url} "
        "log append logs/p:out --max-age 0.05"
    )
    subprocess.run(cmd, shell=True, check=True, capture_output=True)
    store = clawstore.open(store_url)
    log = logs.load(store, "logs/p:out")
    assert log.closed and b"".join(logs.read(store, "logs/p:out")) == b"0\n1\n2\n3\n4\n"
    assert len(log.segments) >= 1


def test_cache_cli_exit_statuses_and_ls(cs, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    r = cs("cache", "save", "npm-linux-1", str(src), "--scope", "app")
    assert r.code == 0 and r.text.strip().startswith("sha256:")
    again = cs("cache", "save", "npm-linux-1", str(src), "--scope", "app")
    assert again.code == 0 and "exists" in again.err and again.text == r.text
    hit = cs("cache", "restore", "npm-linux-1", str(tmp_path / "o1"), "--scope", "app")
    assert (hit.code, hit.text) == (0, "hit npm-linux-1\n")
    assert (tmp_path / "o1" / "a.txt").read_text() == "a"
    part = cs(
        "cache",
        "restore",
        "npm-linux-2",
        str(tmp_path / "o2"),
        "--scope",
        "app",
        "--restore-key",
        "npm-linux-",
    )
    assert (part.code, part.text) == (3, "partial npm-linux-1\n")
    miss = cs("cache", "restore", "pip-1", str(tmp_path / "o3"), "--scope", "app", "--restore-key", "pip-")
    assert (miss.code, miss.text) == (4, "miss\n") and not (tmp_path / "o3").exists()
    ls = cs("cache", "ls", "--scope", "app")
    assert "npm-linux-1" in ls.text and "scope app: 1 entries" in ls.text
    assert cs("cache", "budget", "app", "100").code == 0
    assert "app  100 B" in cs("cache", "budget").text
    ev = cs("cache", "evict", "--dry-run")
    assert "would evict app npm-linux-1" in ev.text
    assert cs("cache", "evict").code == 0
    assert "0 entries" in cs("cache", "ls", "--scope", "app").text
    assert_error(cs("cache", "rm", "npm-linux-1", "--scope", "app"), "not found")


def test_cache_cli_errors_are_one_line(cs, tmp_path: Path) -> None:  # noqa: F811
    assert_error(cs("cache", "save", "a,b", str(tmp_path)), "comma")
    assert_error(cs("cache", "save", "k", str(tmp_path), "--scope", "Bad Scope"), "invalid cache scope")
    assert_error(cs("cache", "restore", "k" * 600, str(tmp_path / "o")), "512")
    assert cs("cache", "budget", "app", "lots").code == 2
