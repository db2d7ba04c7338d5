"""Episode bags -> LeRobot v3.0 dataset with RECAP labels (``recap-export``).

ROS-free: ``align`` (control-clock resampling), ``bagread`` (rosbags), ``exporter`` (labels via
recap_ros.recap.returns), ``cli`` (console script). The dataset format
(writer and reader) is the lower package recap_ros.dataset."""
