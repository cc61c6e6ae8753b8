"""The CLI's allocator setting (gloronet.allocator): applied once by the program, never by the
library, skipped when the user chose glibc's thresholds themselves. Run in subprocesses, because
the setting is process-wide."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
PROBE = "from gloronet.allocator import reuse_freed_memory as r; print(r(), r())"


def _probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                               "GLORONET_SYSTEM_MALLOC")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_applied_once_on_glibc():
    assert _probe() == "True True"


@pytest.mark.parametrize("var", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLORONET_SYSTEM_MALLOC"])
def test_user_choice_wins(var):
    assert _probe(**{var: "1"}) == "False False"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("value", ["0", "false", ""])
def test_system_malloc_off_means_tuned(value):
    assert _probe(GLORONET_SYSTEM_MALLOC=value) == "True True"


def test_library_import_and_cli_main_leave_malloc_alone():
    """Importing gloronet and calling cli.main (what tests and embedding programs do) never tune
    the allocator: only the console entry point does."""
    code = ("import gloronet, gloronet.cli, gloronet.allocator as a; gloronet.cli.main(['models']); "
            "print('untouched' if a._applied is None else 'tuned')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("untouched")
