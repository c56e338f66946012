"""ROS 2 wrapper of the ism-edge defense runtime (``ros2 run ism_edge_ros defense_node``)."""
