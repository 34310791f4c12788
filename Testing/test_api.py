"""The public API: every exported name resolves, and the package imports without torch."""

import subprocess
import sys
from pathlib import Path

import ConvLoRASegLib

ROOT = Path(__file__).resolve().parents[1]


def test_every_export_resolves():
    for name in ConvLoRASegLib.__all__:
        assert getattr(ConvLoRASegLib, name) is not None, name
    from ConvLoRASegLib import metrics

    assert callable(metrics.surface_dice)


def test_package_and_errors_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import ConvLoRASegLib, ConvLoRASegLib.errors\n"
            "assert ConvLoRASegLib.__version__\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
