"""sd_notify: what systemd is told, over a real datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

from pitcher_rpc.process.notify import notify


def test_notify_sends_key_value_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tempfile.mkdtemp(prefix="pitcher-n-", dir="/tmp")
    path = os.path.join(directory, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify(READY=1, MAINPID=4242) is True
        listener.settimeout(2)
        assert listener.recv(1024) == b"READY=1\nMAINPID=4242"
    os.unlink(path)
    os.rmdir(directory)


def test_notify_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY=1) is False


def test_a_socket_that_is_gone_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/tmp/pitcher-no-such-notify.sock")
    assert notify(READY=1) is False
