"""Episode bags -> LeRobot v3.0 dataset with RECAP labels (``recap-export``), and its reader for training.

ROS-free: ``align`` (control-clock resampling), ``bagread`` (rosbags), ``exporter`` (labels via
recap_ros.recap.returns), ``lerobot`` (writer), ``dataset`` (reader), ``cli`` (console script)."""
