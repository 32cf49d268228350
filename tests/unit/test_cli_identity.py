"""The operator's identity needs no passwd entry (the image runs as a numeric user)."""

from __future__ import annotations

import getpass
import pwd

import pytest

from fabric_operator import cli


def test_identity_without_a_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KeyError):
        getpass.getuser()  # what kopf's default identity calls
    identity = cli._identity()
    assert "/" in identity and identity.split("/")[1].isdigit()
