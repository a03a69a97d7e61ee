"""Ray's state files written atomically to a local storage folder (pefttune.runtime.atomic_fs)."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.fs

from pefttune.runtime.atomic_fs import atomic_storage, ray_storage_filesystem, restore_filesystem, restore_path


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    fs = atomic_storage()
    target = tmp_path / "experiment_state-1.json"
    target.write_bytes(b"old state")
    stream = fs.open_output_stream(str(target))
    stream.write(b"new state, in part")
    assert target.read_bytes() == b"old state"  # mid-write: the reader still sees the old file
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # the part is hidden beside it
    stream.write(b" and the rest")
    stream.close()
    assert target.read_bytes() == b"new state, in part and the rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_state-1.json"]  # no temporary left


def test_copy_files_to_it_and_pickling(tmp_path):
    source = tmp_path / "staging"
    (source / "sub").mkdir(parents=True)
    (source / "a.pkl").write_bytes(b"a" * 100)
    (source / "sub" / "b.json").write_bytes(b"{}")
    fs = atomic_storage()
    pyarrow.fs.copy_files(str(source), str(tmp_path / "storage"), destination_filesystem=fs)
    assert (tmp_path / "storage" / "a.pkl").read_bytes() == b"a" * 100
    assert (tmp_path / "storage" / "sub" / "b.json").read_bytes() == b"{}"
    fs.copy_file(str(tmp_path / "storage" / "a.pkl"), str(tmp_path / "storage" / "c.pkl"))
    assert (tmp_path / "storage" / "c.pkl").read_bytes() == b"a" * 100
    again = pickle.loads(pickle.dumps(fs))  # Ray sends it to every trial
    assert again.equals(fs) and again.get_file_info(str(tmp_path / "storage" / "c.pkl")).size == 100
    assert ray_storage_filesystem("s3://bucket/results") is None  # a URI: pyarrow's own filesystem
    assert restore_filesystem(str(tmp_path / "storage" / "study")).equals(fs)
    assert restore_path("relative/study") == os.path.abspath("relative/study")
    assert restore_path("s3://bucket/study") == "s3://bucket/study"


WRITER = textwrap.dedent("""
    import sys, time
    from pefttune.runtime.atomic_fs import atomic_storage
    stream = atomic_storage().open_output_stream(sys.argv[1])
    stream.write(b"x" * 1000)
    print("writing", flush=True)
    while True:
        stream.write(b"x" * 1000)
        time.sleep(0.01)
""")


def test_a_writer_killed_mid_file_leaves_the_old_file(tmp_path):
    target = tmp_path / "searcher-state-1.pkl"
    target.write_bytes(b"complete old state")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    assert target.read_bytes() == b"complete old state"
