"""Offline learning from recorded experience (`ami-ros train --bag`), without ROS.

    samples    recorded frames and actions -> training steps (rosbags' typestore decodes the CDR)
    sequences  the bounded shuffle window and the dynamics' training windows
    imitation  behaviour cloning of the recorded actions (--imitate)
    training   the offline loop: epochs over streamed steps, the core trainers, the checkpoint
"""
