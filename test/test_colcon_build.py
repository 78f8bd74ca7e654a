"""colcon builds ami_ros as an ament_python package, laid out as ROS 2 expects."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLCON = Path(sys.executable).parent / 'colcon'


@pytest.fixture(scope='module')
def install(tmp_path_factory):
    if not COLCON.exists():
        pytest.fail(f'{COLCON} missing: run scripts/setup.sh (it installs colcon-common-extensions)')
    ws = tmp_path_factory.mktemp('ws')
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for rel in tracked:
        dst = ws / 'src' / 'ami_ros' / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    result = subprocess.run([str(COLCON), 'build', '--base-paths', 'src'], cwd=ws,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return ws / 'install' / 'ami_ros'


def test_every_node_executable_is_under_lib(install):
    from ami_ros.cli import available_nodes

    lib = install / 'lib' / 'ami_ros'
    installed = {p.name for p in lib.iterdir()}
    for node in available_nodes():
        assert node in installed, f'{node} not installed under {lib}'
        assert os.access(lib / node, os.X_OK)


def test_launch_and_config_are_under_share(install):
    share = install / 'share' / 'ami_ros'
    assert (share / 'launch' / 'ami.launch.py').is_file()
    assert (share / 'config' / 'ami.yaml').is_file()
    assert (share / 'package.xml').is_file()
    assert (install / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'ami_ros').is_file()


def test_installed_package_finds_its_share_through_the_ament_index(install):
    env = {**os.environ, 'AMENT_PREFIX_PATH': str(install),
           'PYTHONPATH': str(next((install / 'lib').glob('python3*/site-packages')))}
    code = 'from ami_ros.graph import package_share, default_params_file; ' \
           'import ami_ros; print(package_share()); print(ami_ros.__file__)'
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=install, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == str(install / 'share' / 'ami_ros')
    assert out[1].startswith(str(install))  # the installed copy, not the source tree
    # The installed ami-ros entry point runs.
    help_text = subprocess.run([str(install / 'lib' / 'ami_ros' / 'ami-ros'), '--help'], env=env,
                               capture_output=True, text=True, check=True).stdout
    assert 'launch' in help_text and 'run' in help_text
