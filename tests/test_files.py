"""runtime/files.py: a file written through it is there whole or not at all."""
import subprocess
import sys
import textwrap

from runtime.files import atomic_write


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "meta.json"
    atomic_write(path, "first\n")
    atomic_write(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]


def test_atomic_write_that_fails_midway_keeps_the_old_file(tmp_path):
    """A real failure: the process may not write files over 4 KiB (RLIMIT_FSIZE), so the 64 KiB write fails with
    EFBIG part way through. The old contents stay and no temporary file is left beside them."""
    path = tmp_path / "report.html"
    path.write_text("old report")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from runtime.files import atomic_write
        try:
            atomic_write({str(path)!r}, b"x" * 65536)
        except OSError as e:
            print("failed", e.errno)
            sys.exit(0)
        sys.exit("the write did not fail")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("failed")
    assert path.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
