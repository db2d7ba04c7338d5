"""The LeRobot v3.0 dataset format, ROS-free and below every other layer: ``layout`` (version, paths, metadata
tables), ``writer`` (LeRobotWriter, appending episodes; used by recap_ros.export) and ``reader`` (RecapDataset;
used by recap_ros.recap for training). Imports nothing else from recap_ros."""
