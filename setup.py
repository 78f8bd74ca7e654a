"""ami_ros: an ament_python package that also installs with plain pip."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'ami_ros'

# One executable per node (ros2 run ami_ros <node>); every executable that
# ami_ros/graph.py starts must be here (test_launch_description checks).
NODES = [
    'camera',
    'agent',
    'osc_bridge',
    'manager',
    'doom_world',
    'vae_trainer',
    'dynamics_trainer',
    'policy_trainer',
    'recorder',
    'bag_recorder',
    'web_api',
    'viewer',
]

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'bench', 'bench.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')
         + glob('config/*.rviz') + glob('config/*.perspective')),
    ],
    install_requires=['setuptools'],
    # The live view (viewer node): rerun-sdk and its web viewer, about 750 MB.
    extras_require={'view': ['rerun-sdk>=0.41,<0.42']},
    zip_safe=False,
    maintainer='ami_ros developers',
    maintainer_email='ami_ros@example.com',
    description='A continually learning curiosity agent for VRChat as a ROS 2 node graph.',
    license='MIT',
    python_requires='>=3.10',
    entry_points={
        'console_scripts': ['ami-ros = ami_ros.cli:main']
        + [f'{node} = ami_ros.nodes.{node}:main' for node in NODES],
    },
)
