"""One rule for opening a store: only writing commands create one, and only in an absent or
empty directory; a directory holding some of a store's files but not all is a damaged store
for every command; no command ever creates anything while reading.

Each command of the CLI runs on each layout; the directory is compared before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from snapfs.cli import main
from snapfs.errors import StoreCorrupt
from snapfs.store import Store
from snapfs.stream.writer import image_layout
from tests.conftest import snapfs_cmd
from tests.support.synthetic import write_synthetic

READING = [["list"], ["check"], ["check", "--verify-data"], ["info", "s"], ["cat", "s", "info.json"],
           ["gc"], ["rm", "s"]]


def _tree(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every entry under ``path`` with its size and mtime (None if ``path`` does not exist)."""
    if not path.exists():
        return None
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _layout(kind: str, where: Path) -> Path:
    """A store directory in the state ``kind``."""
    store = where / "store"
    if kind == "absent":
        return store
    store.mkdir()
    if kind == "foreign":
        (store / "precious.txt").write_text("not yours")
        return store
    if kind == "empty":
        return store
    with Store.open(store) as s:
        write_synthetic(s, "s", 1, [40])
    if kind == "no-config":
        os.unlink(store / "config.json")
    elif kind == "no-catalog":
        for name in os.listdir(store):
            if name.startswith("catalog.sqlite"):
                os.unlink(store / name)
    elif kind == "no-segments":
        shutil.rmtree(store / "segments")
    return store


EXPECT = {   # layout -> (exit code, words of the one-line error) for every command but snapshot
    "absent": (5, "no snapfs store at"),
    "empty": (5, "no snapfs store at"),
    "foreign": (5, "is not empty and is not a snapfs store"),
    "no-config": (6, "is damaged: config.json missing"),
    "no-catalog": (6, "is damaged: catalog.sqlite missing"),
    "no-segments": (6, "is damaged: segments missing"),
}


@pytest.mark.parametrize("kind", list(EXPECT))
def test_reading_commands_never_create_anything(kind, tmp_path, capsys, monkeypatch):
    store = _layout(kind, tmp_path)
    code, words = EXPECT[kind]
    before = _tree(store)
    for args in READING:
        assert main([args[0], "--store", str(store), *args[1:]]) == code, args
        out, err = capsys.readouterr()
        if args[0] == "check" and code == 6:   # check reports damage as its findings
            assert err == "" and words in out, (args, out)
        else:
            assert err.startswith("snapfs: ") and err.count("\n") == 1 and words in err, (args, err)
        assert _tree(store) == before, args
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert main(["mount", "--store", str(store), str(mnt)]) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not os.path.ismount(mnt)
    assert _tree(store) == before


def _stream(tmp_path: Path) -> Path:
    path = tmp_path / "stream"
    layout = image_layout([("pc.ram", os.urandom(8 * 4096))])
    path.write_bytes(layout.read(0, layout.size))
    return path


@pytest.mark.parametrize("kind", list(EXPECT))
def test_writing_commands_create_only_where_nothing_is(kind, tmp_path, snapfs_env):
    store = _layout(kind, tmp_path)
    stream = _stream(tmp_path)
    env = {**snapfs_env, "SNAPFS_STORE": str(store)}
    before = _tree(store)
    target = subprocess.Popen(["sleep", "60"])
    try:
        with open(stream, "rb") as src:
            runs = [subprocess.run([*snapfs_cmd(), "snapshot", str(target.pid), "--name", "taken"],
                                   env=env, capture_output=True, text=True, timeout=120),
                    subprocess.run([*snapfs_cmd(), "incoming", "--name", "ingested"], stdin=src,
                                   env=env, capture_output=True, text=True, timeout=120)]
    finally:
        target.kill()
        target.wait()
    for run in runs:
        assert "Traceback" not in run.stderr, run.stderr
        if kind in ("absent", "empty"):
            assert run.returncode == 0, run.stderr
        else:
            code, words = EXPECT[kind]
            assert run.returncode == code and words in run.stderr, run.stderr
            assert run.stderr.count("\n") == 1, run.stderr
    if kind in ("absent", "empty"):
        with Store.open(store, create=False) as s:
            assert [i.name for i in s.list_snapshots()] == ["taken", "ingested"]
    else:
        assert _tree(store) == before


def test_an_interrupted_creation_is_finished_by_a_writer(tmp_path):
    """config.json is written last: a creation killed before it left only empty skeleton
    files. A writing command finishes the store; a reading one calls it incomplete."""
    store = tmp_path / "store"
    Store.open(store).close()
    os.unlink(store / "config.json")
    with pytest.raises(StoreCorrupt, match="is damaged: config.json missing"):
        Store.open(store, create=False)
    with Store.open(store, create=True) as s:
        write_synthetic(s, "s", 1, [10])
    assert (store / "config.json").exists()
    # Once something is stored, losing config.json is damage even for writers.
    os.unlink(store / "config.json")
    with pytest.raises(StoreCorrupt, match="is damaged: config.json missing"):
        Store.open(store, create=True)
    assert not (store / "config.json").exists()
    # An empty catalog file (killed before the schema was written) is unfinished too.
    shutil.rmtree(store)
    store.mkdir()
    (store / "catalog.sqlite").write_bytes(b"")
    Store.open(store, create=True).close()
    assert (store / "config.json").exists()
