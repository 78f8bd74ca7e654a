"""Worlds the agent acts in, without ROS: today the embedded ViZDoom world.

A world takes the agent's held input and hands back frames and a pose; its
node (`ami_ros.nodes.doom_world`) puts it on topics. `world_map` turns a
level's lines and the player's visits into grids and a trail, for rviz.
"""
