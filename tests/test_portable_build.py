"""The portable build: what `pip install` produces on a machine that is not x86-64 (only the
scalar kernels, no -mavx* flags, no x86 CPU detection). FASTCONV_PORTABLE=1 forces that build
path here; the test builds it into a temporary folder and runs part of the suite against it
in a subprocess."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_portable_build_installs_and_passes(tmp_path):
    env = {**os.environ, "FASTCONV_PORTABLE": "1"}
    env.pop("FASTCONV_ISA", None)
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    # No x86 flag reached the compiler.
    assert "-mavx" not in build.stdout + build.stderr
    shutil.copytree(ROOT / "fastconv", tmp_path / "fastconv", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env["PYTHONPATH"] = str(tmp_path)
    check = subprocess.run(
        [sys.executable, "-c",
         "import fastconv, sys; print(fastconv.__file__); "
         "assert fastconv.__file__.startswith(sys.argv[1]); "
         "assert fastconv.backend.built_isas() == ['scalar'], fastconv.backend.built_isas(); "
         "assert fastconv.available_isas() == ['scalar']; "
         "assert fastconv.get_isa() == 'scalar'", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    which = tmp_path / "test_which_build.py"  # runs in the same pytest process as the suite
    which.write_text("import fastconv\n"
                     "def test_suite_runs_the_portable_build():\n"
                     f"    assert fastconv.__file__.startswith({str(tmp_path)!r})\n"
                     "    assert fastconv.backend.built_isas() == ['scalar']\n")
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(which),
         str(ROOT / "tests" / "test_conv2d.py"), str(ROOT / "tests" / "test_dispatch.py"),
         str(ROOT / "tests" / "test_paths.py"), "-k", "not avx2 and not avx512"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout
