"""Shared test set-up: a private cache folder per session, the shared-data path, a tiny image writer."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# `make test` runs test files side by side (pytest-xdist): each worker, and what it launches, gets its share of the
# cores, set before any test imports torch; workers at torch's default threads would fight over them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# Real data beside the repo (../shared/data); absent on users' machines, so tests using it skip.
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"

_session_cache: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test imports roseprior, so nothing (e.g. the synthetic default set) is
    # written to ~/.cache; a cache the caller set on purpose is kept. xdist's workers inherit it from the
    # controller, so they share one cache (the default set is generated under a lock).
    global _session_cache
    if not os.environ.get("ROSEPRIOR_CACHE"):
        _session_cache = tempfile.mkdtemp(prefix="roseprior-test-cache-")
        os.environ["ROSEPRIOR_CACHE"] = _session_cache


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session_cache is not None:
        shutil.rmtree(_session_cache, ignore_errors=True)
        os.environ.pop("ROSEPRIOR_CACHE", None)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared development data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, size=(w, h), seed=0)``: a small random RGB image; the seed fixes its pixels."""

    def write(path: str | Path, size: tuple[int, int] = (16, 12), seed: int = 0, **save_kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, **save_kwargs)
        return path

    return write


def kill_at_first_checkpoint(cmd: list[str], out: Path, env: dict, cwd: Path, timeout: float = 200) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``out/checkpoints`` holds a complete checkpoint."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not list((out / "checkpoints").glob("step_*/meta.json")):
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint within {timeout:.0f} s"
            time.sleep(0.02)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert alive, "the run finished before it could be killed"


@pytest.fixture
def chromium(tmp_path: Path):
    """A headless Chromium (selenium driver) for pages people open, with a profile of its own; the test skips
    when Chromium, its driver or selenium is absent (`.ci/run` installs them)."""
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver_path).exists()):
        pytest.skip("headless Chromium absent: install the Debian packages chromium and chromium-driver")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1300,1000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
