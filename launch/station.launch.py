"""Launch a whole recap_ros station:  ros2 launch recap_ros station.launch.py station:=<name|path>

The node graph comes from recap_ros.launch_graph (the same module the no-ROS `recap-station` runner uses),
so both launchers start the same nodes with the same parameters. Like the runner, it points
FASTDDS_DEFAULT_PROFILES_FILE at the package's Fast DDS profile (config/fastdds.xml) unless it is already set
(set it empty for stock Fast DDS settings).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable, UnsetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from recap_ros import launch_graph


def _dds_profile(context):
    return [UnsetEnvironmentVariable(name) if value is None else SetEnvironmentVariable(name, value)
            for name, value in launch_graph.environment_changes(context.environment).items()]


def _nodes(context):
    station = LaunchConfiguration("station").perform(context)
    return [
        Node(package="recap_ros", executable=spec.executable, name=spec.name, namespace=spec.namespace or None,
             parameters=[spec.parameters], remappings=list(spec.remappings), output="screen",
             emulate_tty=True)
        for spec in launch_graph.specs_for(station)
    ]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("station", default_value="sim",
                              description="station name under config/stations/ or a path to a station YAML"),
        OpaqueFunction(function=_dds_profile),
        OpaqueFunction(function=_nodes),
    ])
