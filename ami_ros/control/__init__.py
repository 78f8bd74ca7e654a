"""Ways to control a running graph from outside ROS (no ROS imports here)."""
