"""Thread settings of the served path (no timings: only what gets set where)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tokenmill.engine import cpu_threads
from tokenmill.engine.cpu_threads import (
    engine_core_environment,
    parse_cpu_list,
    pin_engine_core,
    spawn_environment,
)


def test_user_openmp_settings_win() -> None:
    assert engine_core_environment({"OMP_WAIT_POLICY": "active"}) == {}
    assert engine_core_environment({"GOMP_SPINCOUNT": "5", cpu_threads.SPIN_ENV: "9"}) == {}


def test_spin_count_from_tokenmill_variable() -> None:
    assert engine_core_environment({cpu_threads.SPIN_ENV: "10000"}) == {
        "GOMP_SPINCOUNT": "10000"}
    assert engine_core_environment({cpu_threads.SPIN_ENV: "default"}) == {}
    with pytest.raises(ValueError):
        engine_core_environment({cpu_threads.SPIN_ENV: "fast"})


def test_default_spin_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "DEFAULT_SPINCOUNT", "1234")
    assert engine_core_environment({}) == {"GOMP_SPINCOUNT": "1234"}


def test_spawn_environment_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TM_TEST_KEEP", "old")
    monkeypatch.delenv("TM_TEST_NEW", raising=False)
    with spawn_environment({"TM_TEST_KEEP": "new", "TM_TEST_NEW": "1"}):
        assert os.environ["TM_TEST_KEEP"] == "new"
        assert os.environ["TM_TEST_NEW"] == "1"
    assert os.environ["TM_TEST_KEEP"] == "old"
    assert "TM_TEST_NEW" not in os.environ


def _child_env(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(os.environ.get("GOMP_SPINCOUNT"))


def test_spawned_child_sees_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with spawn_environment({"GOMP_SPINCOUNT": "777"}):
        process = ctx.Process(target=_child_env, args=(queue,))
        process.start()
    assert queue.get(timeout=60) == "777"
    process.join(60)
    assert "GOMP_SPINCOUNT" not in os.environ


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-1") == [0, 1]
    assert parse_cpu_list("3, 0-1,1") == [0, 1, 3]
    for bad in ("", "a", "2-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_pin_engine_core_in_a_child() -> None:
    assert pin_engine_core({}) is None
    cpu = min(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_pinned_child, args=(queue, str(cpu)))
    process.start()
    assert queue.get(timeout=60) == ([cpu], 1)
    process.join(60)


def _pinned_child(queue: multiprocessing.Queue, cpus: str) -> None:  # type: ignore[type-arg]
    from tokenmill.engine.placement import usable_cpus

    pinned = pin_engine_core({cpu_threads.ENGINE_CPUS_ENV: cpus})
    queue.put((pinned, usable_cpus()))
