"""Episode recording to rosbag2 (MCAP, zstd) from serialized CDR bytes; ROS-free.

- :mod:`.bag`: one bag (BagWriter), the ``recap.*`` custom_data keys (EpisodeFacts), metadata.yaml helpers.
- :mod:`.writer`: EpisodeRecorder, bounded queue + writer thread + episode lifecycle (used by the
  episode_recorder node and by ROS-free rollouts).
- :mod:`.repair`: ``recap-bag-repair`` for bags left by a killed recorder.
"""
from recap_ros.recording.bag import (OUTCOMES, BagError, BagWriter, EpisodeFacts, episode_bags, episode_dir_name,
                                     matched_subscription_qos, parse_episode_dir, update_custom_data)
from recap_ros.recording.writer import EpisodeRecorder, EpisodeSummary, RecorderConfig, RecorderError

__all__ = ["OUTCOMES", "BagError", "BagWriter", "EpisodeFacts", "EpisodeRecorder", "EpisodeSummary",
           "RecorderConfig", "RecorderError", "episode_bags", "episode_dir_name", "matched_subscription_qos",
           "parse_episode_dir", "update_custom_data"]
