"""The driver's heartbeat (heartbeat.json): a killed driver is seen at once, a finished and a failed
one are told apart, another host goes by the age of the heartbeat, and `pefttune run` ends a failed
study with one line."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from pefttune.analysis.status import experiment_status, format_status
from pefttune.runtime.heartbeat import (
    HEARTBEAT_FILE,
    Heartbeat,
    HeartbeatRecord,
    StageFailed,
    driver_alive,
    read_heartbeat,
)

DRIVER = """
import sys, time
from pefttune.runtime.heartbeat import Heartbeat

with Heartbeat(sys.argv[1], interval=0.2) as beat:
    beat.stage("data")
    beat.stage("discrete")
    print("ready", flush=True)
    time.sleep(600)
"""


def _dead_pid() -> int:
    """The id of a process that has ended and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def driver(tmp_path):
    """A real driver process (its own process group) inside a Heartbeat, in stage 'discrete'."""
    study = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(study)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield study, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_driver_is_interrupted_within_seconds_and_its_elapsed_time_stops(driver):
    study, proc = driver
    first = experiment_status(study)
    assert first.state == "running" and first.stage == "discrete"
    time.sleep(1.0)
    second = experiment_status(study)
    assert second.state == "running" and second.elapsed_s >= first.elapsed_s + 0.9  # grows while it runs
    record = read_heartbeat(study)
    assert record.pid == proc.pid and record.host == socket.gethostname() and record.state == "running"
    assert [s["name"] for s in record.stages] == ["data"]

    os.killpg(proc.pid, signal.SIGKILL)  # as `kill -9` of the driver's process group
    killed = time.time()
    proc.wait()
    while True:
        status = experiment_status(study)
        if status.state != "running" or time.time() - killed > 10:
            break
        time.sleep(0.1)
    seen_after = time.time() - killed
    assert status.state == "interrupted", f"still {status.state} {seen_after:.1f} s after the kill"
    assert seen_after < 10
    assert status.stage == "discrete" and status.eta_s is None
    text = format_status(status)
    assert "interrupted" in text and "discrete" in text and f"pid {proc.pid}" in text
    assert all(len(line) <= 120 for line in text.splitlines())

    time.sleep(1.0)
    later = experiment_status(study)
    assert later.state == "interrupted"
    assert later.elapsed_s == pytest.approx(status.elapsed_s, abs=1e-6)  # stopped at the last heartbeat
    assert later.elapsed_s < second.elapsed_s + 2.0  # the killed driver's last sign of life


def test_a_finished_context_records_its_stages(tmp_path):
    study = tmp_path / "study"
    with Heartbeat(study, interval=0.05) as beat:
        beat.stage("data")
        time.sleep(0.1)
        beat.stage("discrete")
        inside = read_heartbeat(study)
        assert inside.state == "running" and inside.stage == "discrete" and driver_alive(inside)
        time.sleep(0.3)
        refreshed = read_heartbeat(study)
        assert refreshed.updated > inside.updated  # the daemon thread keeps it fresh
        assert experiment_status(study).state == "running"
    record = read_heartbeat(study)
    assert record.state == "finished" and record.pid == os.getpid() and record.stage is None
    assert [s["name"] for s in record.stages] == ["data", "discrete"]
    data, discrete = record.stages
    assert record.started <= data["started"] <= data["ended"] == discrete["started"] <= discrete["ended"]
    assert data["ended"] - data["started"] >= 0.1
    assert not driver_alive(record)  # the process lives, but the study is over
    assert not list(study.glob(".heartbeat.json.*"))  # no temporary file left behind

    status = experiment_status(study)
    assert status.state == "finished" and status.eta_s is None
    assert status.elapsed_s == pytest.approx(record.updated - record.started)
    time.sleep(0.2)
    assert experiment_status(study).elapsed_s == status.elapsed_s


def test_a_failed_context_logs_the_traceback_and_names_the_stage(tmp_path):
    study = tmp_path / "study"
    with pytest.raises(StageFailed) as info:
        with Heartbeat(study, interval=0.05) as beat:
            beat.stage("discrete")
            beat.stage("replicates")
            raise ValueError("seed 7 is not one of train.seeds")
    err = info.value
    assert isinstance(err, RuntimeError) and err.stage == "replicates"
    assert isinstance(err.__cause__, ValueError)
    assert err.log_path == str(study / "errors.log")
    assert str(err) == (f"the study failed in stage replicates: ValueError: seed 7 is not one of train.seeds "
                        f"(traceback: {study / 'errors.log'})")
    log = (study / "errors.log").read_text()
    assert "[replicates]" in log and "Traceback (most recent call last)" in log
    assert "ValueError: seed 7 is not one of train.seeds" in log and "test_heartbeat.py" in log
    record = read_heartbeat(study)
    assert record.state == "failed" and record.stage == "replicates"
    assert [s["name"] for s in record.stages] == ["discrete"]

    status = experiment_status(study)
    assert status.state == "failed" and status.stage == "replicates"
    assert "failed in stage replicates" in format_status(status)


def test_an_interrupt_is_reraised_as_is(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Heartbeat(tmp_path, interval=0.05) as beat:
            beat.stage("analysis")
            raise KeyboardInterrupt
    assert read_heartbeat(tmp_path).state == "interrupted"
    assert not (tmp_path / "errors.log").exists()
    assert experiment_status(tmp_path).state == "interrupted"


def test_a_nested_failure_is_not_wrapped_twice(tmp_path):
    with pytest.raises(StageFailed) as info:
        with Heartbeat(tmp_path / "suite", interval=0.05) as outer:
            outer.stage("task ks")
            with Heartbeat(tmp_path / "suite" / "ks", interval=0.05) as inner:
                inner.stage("darts")
                raise OSError("disk full")
    assert info.value.stage == "darts" and isinstance(info.value.__cause__, OSError)
    assert read_heartbeat(tmp_path / "suite").state == "failed"
    assert read_heartbeat(tmp_path / "suite" / "ks").state == "failed"


def _record(**overrides) -> HeartbeatRecord:
    now = time.time()
    fields = {"pid": os.getpid(), "host": socket.gethostname(), "started": now - 100, "updated": now,
              "stage": "discrete", "stage_started": now - 50, "state": "running"}
    return HeartbeatRecord(**{**fields, **overrides})


def test_the_liveness_rule_on_this_and_on_another_host():
    now = time.time()
    # this host: the process decides, not the age of the heartbeat
    assert driver_alive(_record(updated=now - 3600), now)
    assert not driver_alive(_record(pid=_dead_pid()), now)
    assert not driver_alive(_record(state="finished"), now)
    # another host: a process id there means nothing here; the age of the heartbeat decides
    elsewhere = _record(host="elsewhere.invalid", pid=_dead_pid())
    elsewhere.updated = now - 5
    assert driver_alive(elsewhere, now)
    elsewhere.updated = now - 20
    assert not driver_alive(elsewhere, now) and driver_alive(elsewhere, now, stale_after=30)
    assert not driver_alive(_record(host="elsewhere.invalid", state="failed"), now)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_reused_process_id_is_not_the_driver():
    with Heartbeat("s3://bucket/none") as beat:  # remote storage: no file, the record is still kept
        record = beat.record
    assert record.pid_start is not None and driver_alive(_record(pid_start=record.pid_start))
    assert not driver_alive(_record(pid_start=record.pid_start + 1))


def test_status_from_another_host_goes_by_the_heartbeat_age(tmp_path):
    now = time.time()
    record = {"pid": 1, "host": "elsewhere.invalid", "started": now - 600, "updated": now - 4, "stage": "darts",
              "stage_started": now - 60, "stages": [], "state": "running", "pid_start": None}
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps(record))
    status = experiment_status(tmp_path)
    assert status.state == "running" and status.elapsed_s == pytest.approx(600, abs=5)
    assert experiment_status(tmp_path, heartbeat_stale_after=2).state == "interrupted"
    record["updated"] = now - 120
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps(record))
    status = experiment_status(tmp_path, now=now)
    assert status.state == "interrupted" and status.elapsed_s == pytest.approx(480)
    assert "elsewhere.invalid" in format_status(status)


def test_a_remote_study_writes_no_file_but_still_names_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageFailed) as info:
        with Heartbeat("s3://bucket/study") as beat:
            beat.stage("prefill")
            raise RuntimeError("no credentials")
    assert info.value.stage == "prefill" and "RuntimeError: no credentials" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- pefttune run: a failed driver is one line --------------------------------------------------------


def test_run_prints_one_line_when_the_study_fails(tmp_path, monkeypatch, capsys):
    import pefttune.study
    from pefttune.cli import main
    from pefttune.cli import run as run_cli

    study = tmp_path / "study"

    def failing_study(config, **kwargs):
        with Heartbeat(study, interval=0.05) as beat:
            beat.stage("replicates")
            raise ValueError("placement L3 has no method\n  (from search.replicate_top)")

    monkeypatch.setattr(pefttune.study, "run_study", failing_study)
    args = Namespace(config=None, suite=False, address=None, resume=False, name=None, verbose=0, quiet=False)
    assert run_cli.run(args) == 1
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert lines == [f"pefttune run: the study failed in stage replicates: ValueError: placement L3 has no method "
                     f"(from search.replicate_top) (traceback: {study / 'errors.log'})"]
    assert "Traceback" in (study / "errors.log").read_text()

    assert main(["run"]) == 1  # through the entry point: the same single line
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pefttune run: the study failed in stage replicates: ValueError")
