"""Launch the 'aloha_sim' station (MuJoCo ALOHA):  ros2 launch recap_ros aloha_sim.launch.py  (= station.launch.py station:=aloha_sim; bag_dir:=DIR sets where bags go)."""
import os

from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource


def generate_launch_description():
    station = os.path.join(os.path.dirname(os.path.abspath(__file__)), "station.launch.py")
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(station), launch_arguments={"station": "aloha_sim"}.items()),
    ])
