"""Open a page in Debian's headless Chromium: its DOM after load, its console messages and a
screenshot (``./dev test`` installs chromium where it is missing)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
CONSOLE = re.compile(r":CONSOLE[:(]")


@dataclass
class Page:
    dom: str
    console: list[str]
    screenshot: Path


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("chromium is not installed: run ./dev test, which installs it")


def _run(args: list[str], profile: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def open_page(path: Path, screenshot: Path, width: int = 1280, height: int = 4000) -> Page:
    """Load ``path``; return the DOM, every console message, and a screenshot's path."""
    url = path.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        dumped = _run(["--enable-logging=stderr", "--v=0", "--dump-dom", url], profile)
    with tempfile.TemporaryDirectory() as profile:
        _run([f"--window-size={width},{height}", f"--screenshot={screenshot}", url], profile)
    console = [line for line in dumped.stderr.splitlines() if CONSOLE.search(line)]
    return Page(dumped.stdout, console, screenshot)


def print_pdf(path: Path, pdf: Path) -> int:
    """Print ``path`` as Chromium prints it (print styles apply); return the page count."""
    with tempfile.TemporaryDirectory() as profile:
        _run(["--no-pdf-header-footer", f"--print-to-pdf={pdf}", path.resolve().as_uri()], profile)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF"), "not a PDF"
    return len(re.findall(rb"/Type\s*/Page\b", data))
