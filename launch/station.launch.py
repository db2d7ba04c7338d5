"""Launch a whole recap_ros station:  ros2 launch recap_ros station.launch.py station:=<name|path> [bag_dir:=DIR]

The node graph comes from recap_ros.launch_graph (the same module the no-ROS `recap-station` runner uses),
so both launchers start the same nodes with the same parameters. Episode bags go to `bag_dir`; without it, to
the station's recorder.output_dir when that is absolute (or under ~), else to ~/recap_bags/<station> (never
relative to the directory launch was started from); the place is printed at start. Like the runner, it points
FASTDDS_DEFAULT_PROFILES_FILE at the package's Fast DDS profile (config/fastdds.xml) unless it is already set
(set it empty for stock Fast DDS settings).
"""
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, LogInfo, OpaqueFunction, SetEnvironmentVariable,
                            UnsetEnvironmentVariable)
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from recap_ros import launch_graph


def _dds_profile(context):
    return [UnsetEnvironmentVariable(name) if value is None else SetEnvironmentVariable(name, value)
            for name, value in launch_graph.environment_changes(context.environment).items()]


def _nodes(context):
    station, bags, specs = launch_graph.launch_plan(LaunchConfiguration("station").perform(context),
                                                    LaunchConfiguration("bag_dir").perform(context))
    return [LogInfo(msg=f"station '{station.name}': episode bags go to {bags}")] + [
        Node(package="recap_ros", executable=spec.executable, name=spec.name, namespace=spec.namespace or None,
             parameters=[spec.parameters], remappings=list(spec.remappings), output="screen",
             emulate_tty=True)
        for spec in specs
    ]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("station", default_value="sim",
                              description="station name under config/stations/ or a path to a station YAML"),
        DeclareLaunchArgument("bag_dir", default_value="",
                              description="where episode bags go (default: the station's recorder.output_dir "
                                          f"if absolute, else {launch_graph.DEFAULT_BAG_ROOT}/<station>)"),
        OpaqueFunction(function=_dds_profile),
        OpaqueFunction(function=_nodes),
    ])
