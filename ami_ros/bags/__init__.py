"""rosbag2 bags in and out of ami_ros.

    reading    open any bag (ours or foreign, mcap or sqlite3, complete or cut short), stream raw messages
    recording  the bag writer and the recording node behind `ami-ros bag record` and `bag:=DIR`
    info       what `ami-ros bag info` prints, like `ros2 bag info`
    play       publishing a bag's messages with their recorded timing and QoS (`ami-ros bag play`)
"""
