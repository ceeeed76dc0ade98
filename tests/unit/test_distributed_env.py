"""`distributed.fit` hands Train V2 its worker-group start timeout through the environment, for the
call only: the rest of the process keeps its own value."""

from __future__ import annotations

import os

import pytest

from softprompt.ray.train import START_TIMEOUT_ENV, scoped_env


def test_the_start_timeout_is_set_for_the_call_and_put_back_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    with scoped_env(START_TIMEOUT_ENV, "120"):
        assert os.environ[START_TIMEOUT_ENV] == "120"
    assert START_TIMEOUT_ENV not in os.environ

    monkeypatch.setenv(START_TIMEOUT_ENV, "30")
    with pytest.raises(RuntimeError), scoped_env(START_TIMEOUT_ENV, "120"):
        raise RuntimeError("the run failed")
    assert os.environ[START_TIMEOUT_ENV] == "30"
