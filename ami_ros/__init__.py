"""ami_ros: a continually learning curiosity agent for VRChat as a ROS 2 graph.

`ami_ros.core` is the learning core (no ROS imports); `ami_ros.nodes` holds one
thin ROS 2 node per module.
"""

__version__ = '0.1.0'
