"""Launch the ism-edge defense node; every node parameter is a launch argument of the same name.

    ros2 launch ism_edge_ros defense.launch.py engine_dir:=/opt/ism-edge/engines image_topic:=/camera/image_raw
"""

from ism_edge_ros.parameters import PARAMETERS
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description() -> LaunchDescription:
    arguments = [
        # engine_dir has no default: launching without engine_dir:=... is an error naming it.
        DeclareLaunchArgument(name, description=text)
        if name == "engine_dir"
        else DeclareLaunchArgument(name, default_value=str(default), description=text)
        for name, (default, text) in PARAMETERS.items()
    ]
    # value_type keeps every parameter at its declared type ("0" stays an int, a path a string).
    parameters = {
        name: ParameterValue(LaunchConfiguration(name), value_type=type(default))
        for name, (default, _) in PARAMETERS.items()
    }
    node = Node(package="ism_edge_ros", executable="defense_node", name="ism_edge_defense", parameters=[parameters],
                output="screen")
    return LaunchDescription([*arguments, node])
