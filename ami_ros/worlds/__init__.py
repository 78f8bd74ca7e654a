"""Worlds the agent acts in, without ROS: today the embedded ViZDoom world.

A world takes the agent's held input and hands back frames and a pose; its
node (`ami_ros.nodes.doom_world`) puts it on topics.
"""
