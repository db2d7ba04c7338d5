"""Where the package's shared files (stations, launch files, model bundles) live.

Source checkout / editable install: the repository root next to the ``recap_ros`` package.
colcon / pip install: ``<prefix>/share/recap_ros`` (ament_python data_files), found through the ament index
when it is importable, else through ``sys.prefix``. ``RECAP_ROS_SHARE`` overrides both.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

PACKAGE = "recap_ros"
# Fast DDS 3 reads the first; rmw_fastrtps (Kilted) still honours the legacy one with a deprecation warning.
FASTDDS_PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
FASTDDS_PROFILE_ENV_LEGACY = "FASTRTPS_DEFAULT_PROFILES_FILE"


def share_dir() -> Path:
    env = os.environ.get("RECAP_ROS_SHARE")
    if env:
        return Path(env)
    source_root = Path(__file__).resolve().parent.parent
    if (source_root / "package.xml").is_file() and (source_root / "config" / "stations").is_dir():
        return source_root
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except Exception:  # not on a ROS machine, or package not in the ament index
        return Path(sys.prefix) / "share" / PACKAGE


def stations_dir() -> Path:
    return share_dir() / "config" / "stations"


def station_file(name_or_path: str | os.PathLike) -> Path:
    """A station name (``sim``) maps to ``config/stations/sim.yaml``; anything with a suffix or a slash is a path."""
    s = str(name_or_path)
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        return Path(s).expanduser().resolve()
    return stations_dir() / f"{s}.yaml"


def available_stations() -> list[str]:
    return sorted(p.stem for p in stations_dir().glob("*.yaml"))


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """A bundle name (``tiny``) maps to ``models/tiny``; an existing directory path is used as is."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() or os.sep in str(name_or_path):
        return p.resolve()
    return share_dir() / "models" / str(name_or_path)


def fastdds_profile() -> Path:
    """The package's Fast DDS profile (larger shared-memory segment for raw camera frames)."""
    return share_dir() / "config" / "fastdds.xml"


def fastdds_profile_env(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Environment changes that make ROS processes load :func:`fastdds_profile` (value ``None``: unset it).

    A user's choice in ``environ`` (default ``os.environ``) always wins: when either profile variable is set
    nothing is added; when it is set to an empty string (the way to ask for stock Fast DDS settings) it is
    removed, since Fast DDS would log an error for an empty path."""
    environ = os.environ if environ is None else environ
    names = (FASTDDS_PROFILE_ENV, FASTDDS_PROFILE_ENV_LEGACY)
    if any(name in environ for name in names):
        return {name: None for name in names if environ.get(name) == ""}
    return {FASTDDS_PROFILE_ENV: str(fastdds_profile())}
