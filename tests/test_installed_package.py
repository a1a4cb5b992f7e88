"""The default model ships inside the wheel: load it from an installed package, outside the
source tree. Slow (builds a wheel): `python -m pytest -m slow`."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_model_loads_from_installed_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("pltkit-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    py = tmp_path / "venv" / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    code = ("import pltkit, pathlib; m = pltkit.load_model('default'); "
            "assert 'site-packages' in pltkit.__file__, pltkit.__file__; "
            "print(m.config.plt_num_loops, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loops, params = map(int, out.stdout.split())
    print(f"installed wheel {wheel.name}: default model PLT-{loops}, {params} parameters")
    assert loops == 2
