"""One ROS 2 node per module; each module's `main()` is its executable."""
