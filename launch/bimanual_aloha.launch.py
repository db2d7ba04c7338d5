"""Launch the 'bimanual_aloha' station:  ros2 launch recap_ros bimanual_aloha.launch.py  (same as station.launch.py station:=bimanual_aloha; bag_dir:=DIR sets where bags go)."""
import os

from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource


def generate_launch_description():
    station = os.path.join(os.path.dirname(os.path.abspath(__file__)), "station.launch.py")
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(station), launch_arguments={"station": "bimanual_aloha"}.items()),
    ])
