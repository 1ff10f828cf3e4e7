"""runs.py: one writer per output (a second process is refused by name; a killed writer leaves no lock).
The checkpoint and resume path is tested through the scripts that use it: tests/test_sft.py, tests/test_grpo.py."""
import socket

import pytest
from conftest import another_run_writing

import runs


def test_an_output_has_one_writer_and_a_killed_writer_leaves_no_lock(tmp_path):
    out = tmp_path / "scores.json"
    with another_run_writing(out) as pid:
        with pytest.raises(ValueError) as err:
            runs.hold_output(str(tmp_path / "." / "scores.json"))  # another spelling of the same file
        assert str(err.value) == (f"{tmp_path / '.' / 'scores.json'} is being written by another run (pid {pid} on "
                                  f"{socket.gethostname()}): wait for it to end, or give this one another output")
    runs.hold_output(str(out))  # the holder died by SIGKILL: the kernel dropped its lock, no stale file refuses
    runs.hold_output(str(out))  # asking again in the same process is fine
    assert not out.exists()  # the lock lives beside it, in .scores.json.lock
