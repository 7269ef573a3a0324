"""The driver's background writer: submission order, errors surfacing at flush."""
import logging
import threading
import time

import pytest

from ring_rl.rl.background import BackgroundWriter


def test_writes_run_in_submission_order_off_the_caller_thread():
    seen, threads = [], set()

    def write(i):
        time.sleep(0.002 * (5 - i))  # earlier writes take longer: order must still hold
        seen.append(i)
        threads.add(threading.get_ident())

    w = BackgroundWriter()
    for i in range(5):
        w.submit(write, i)
    w.flush()
    assert seen == [0, 1, 2, 3, 4]
    assert threading.get_ident() not in threads
    w.close()


def test_a_failed_write_is_raised_at_flush_and_later_writes_still_run(tmp_path):
    go = threading.Event()

    def fail():
        go.wait(5)
        raise OSError("disk full")

    w = BackgroundWriter()
    w.submit(fail)
    w.submit((tmp_path / "after").write_text, "x")  # the failure has not happened yet
    go.set()
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    assert (tmp_path / "after").read_text() == "x"
    w.flush()  # the error was reported once
    w.submit(fail)
    while w._pending and not w._pending[0].done():
        time.sleep(0.001)
    with pytest.raises(OSError, match="disk full"):
        w.submit(print)  # a finished failure surfaces at the next submit
    w.close()


def test_close_while_raising_logs_the_write_error_instead(caplog):
    w = BackgroundWriter()
    w.submit(lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="ring_rl.train"):
        w.close(raise_errors=False)
    assert "write failed" in caplog.text and "ZeroDivisionError" in caplog.text
