import os
from pathlib import Path

import pytest
import torch

# Two cores on the reference machine; keep each test process from oversubscribing.
torch.set_num_threads(min(2, torch.get_num_threads()))

ICDAR_ENV = "DBNETPP_ICDAR2015_ROOT"

# Property-based tests (tests/test_properties.py): a small fixed example count, derandomized, by
# default (the same cases on every run, within the suite's time budget); HYPOTHESIS_PROFILE=long
# for a deep search that CI does not run.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the floors environment has no hypothesis: those tests skip
    pass
else:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("default", max_examples=30, derandomize=True, deadline=None,
                              suppress_health_check=_quiet, print_blob=True)  # fmt: skip
    settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=_quiet,
                              print_blob=True)  # fmt: skip
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def icdar_root() -> Path:
    """The real ICDAR 2015 sample, or a skip when DBNETPP_ICDAR2015_ROOT is unset."""
    root = os.environ.get(ICDAR_ENV)
    if not root:
        pytest.skip(f"{ICDAR_ENV} is not set: no ICDAR 2015 data to test on")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"{ICDAR_ENV}={root} is not a directory")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: many small ops, where a second thread only adds
    synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """torch hub's cache under tmp_path (TORCH_HOME) and no network: urlopen refuses every URL
    but file:// ones. Returns the checkpoints folder."""
    import urllib.error
    import urllib.request

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    real = urllib.request.urlopen

    def local_only(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        if not url.startswith("file://"):
            raise urllib.error.URLError("network disabled in tests")
        return real(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def train_module():
    """``examples/train.py`` imported as a module (one import per test module)."""
    from helpers import load_train_script

    return load_train_script("dbnetpp_train_script")
