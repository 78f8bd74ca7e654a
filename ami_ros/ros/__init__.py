"""What the nodes share: the managed-node base, image messages, diagnostics.

Unlike `ami_ros.core`, this package imports rclpy.
"""
