"""The learning core: models, buffers, trainers, reward and codecs.

Nothing in this package imports ROS, so it can be used and tested on its own.
"""
