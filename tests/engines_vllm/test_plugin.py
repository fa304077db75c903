"""The `vllm.general_plugins` entry point, loaded by vLLM's real plugin loader, patching the real Worker."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

from moecap.collect.engines.vllm import adapter

METHODS = adapter._PATCHED_METHODS


@pytest.fixture
def clean_registration():
    from vllm.v1.worker.gpu_worker import Worker

    adapter.unpatch_worker_class(Worker)
    adapter._reset_for_tests()
    yield Worker
    adapter.unpatch_worker_class(Worker)
    adapter._reset_for_tests()


def load_plugins():
    import vllm.plugins as plugins

    plugins.plugins_loaded = False  # the loader runs once per process; tests load it again
    plugins.load_general_plugins()


def test_the_package_declares_the_entry_point(vllm_version):
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "moecap"]
    assert ours and ours[0].value == "moecap.collect.engines.vllm:register"
    # The package's `register` (importing nothing of vLLM until called) hands over to the adapter's.
    import moecap.collect.engines.vllm as package

    assert ours[0].load() is package.register
    calls = []
    original = adapter.register
    adapter.register = lambda: calls.append(1)
    try:
        package.register()
    finally:
        adapter.register = original
    assert calls == [1]


def test_inert_without_a_trace_dir(vllm_version, clean_registration, monkeypatch):
    monkeypatch.delenv(adapter.ENV_TRACE_DIR, raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "moecap")
    load_plugins()
    assert not clean_registration.__dict__.get(adapter._PATCH_MARK)
    assert not hasattr(clean_registration.execute_model, adapter._WRAPPED_MARK)


def test_real_loader_patches_the_real_worker_once(vllm_version, clean_registration, monkeypatch, tmp_path):
    Worker = clean_registration
    originals = {name: Worker.__dict__[name] for name in METHODS}
    monkeypatch.setenv(adapter.ENV_TRACE_DIR, str(tmp_path))
    monkeypatch.setenv("VLLM_PLUGINS", "moecap")
    monkeypatch.delenv(adapter.ENV_RUN_ID, raising=False)
    load_plugins()
    assert Worker.__dict__.get(adapter._PATCH_MARK)
    assert os.environ[adapter.ENV_RUN_ID].split("-")[1] == "vllm"  # children inherit one run id
    for name in METHODS:
        patched = Worker.__dict__[name]
        assert getattr(patched, adapter._WRAPPED_MARK) is originals[name]
        assert inspect.signature(patched) == inspect.signature(originals[name])
    assert callable(Worker.moecap_control)
    # Loading again, registering again, patching again: still one layer of wrapping.
    load_plugins()
    adapter.register()
    adapter._reset_for_tests()
    adapter.register()
    assert not adapter.patch_worker_class(Worker)
    for name in METHODS:
        assert getattr(Worker.__dict__[name], adapter._WRAPPED_MARK) is originals[name]
    adapter.unpatch_worker_class(Worker)
    assert all(Worker.__dict__[name] is originals[name] for name in METHODS)


def test_worker_module_is_patched_when_vllm_imports_it(vllm_version, tmp_path):
    """In a fresh process the plugin loads before vLLM imports the worker module (as in a spawned
    worker): the class is patched the moment that import happens, and not before."""
    code = textwrap.dedent(
        """
        import sys
        import vllm.plugins
        vllm.plugins.load_general_plugins()
        assert "vllm.v1.worker.gpu_worker" not in sys.modules
        from vllm.v1.worker.gpu_worker import Worker
        assert Worker.__dict__.get("_moecap_patched"), "not patched"
        assert hasattr(Worker.execute_model, "__moecap_wrapped__")
        print("OK")
        """
    )
    env = dict(os.environ, MOECAP_TRACE_DIR=str(tmp_path), VLLM_PLUGINS="moecap")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_strict_engine_refuses_an_untested_release(vllm_version, clean_registration, monkeypatch, tmp_path):
    from moecap.collect.engines.vllm import compat as vllm_compat
    from moecap.collect.errors import CollectError

    monkeypatch.setattr(vllm_compat, "installed_version", lambda: "0.34.0")
    monkeypatch.setenv(adapter.ENV_TRACE_DIR, str(tmp_path))
    monkeypatch.setenv(adapter.ENV_STRICT, "1")
    with pytest.raises(CollectError, match=r"0\.34\.0 is outside"):
        adapter.register()
    assert not clean_registration.__dict__.get(adapter._PATCH_MARK)
    monkeypatch.delenv(adapter.ENV_STRICT)
    adapter.register()  # a warning, and tracing goes on
    assert clean_registration.__dict__.get(adapter._PATCH_MARK)
