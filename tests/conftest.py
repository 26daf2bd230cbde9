"""Test session set-up: 8 simulated CPU devices (a small pod) before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole session (in-process tests and every entry point they start):
# the end-to-end tests start dozens of processes that compile the same tiny programs. Cache hits change no result
# (the key covers the program, the devices and the flags); a fresh directory per session keeps runs independent.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # pytest-xdist's workers inherit the controller's
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="starling_jax_xla_cache.")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(config, items):
    """Longest first: the embedded-default runs, then the other end-to-end (`slow`/`multiprocess`) tests, then the
    rest, so that pytest-xdist's two workers finish together instead of one running a long test alone at the end."""

    def cost_rank(item) -> int:
        if item.path.name == "test_default_run.py":
            return 0
        return 1 if item.get_closest_marker("slow") or item.get_closest_marker("multiprocess") else 2

    items.sort(key=cost_rank)
