"""ROS 2 nodes, one file each; they only wire ROS topics, parameters and timers to the ROS-free modules."""
from __future__ import annotations

import gc
import sys
from typing import Callable


def run_node(name: str, make_node: Callable, args=None,
             config_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Shared ``main`` body: init rclpy, build the node, spin it on a SingleThreadedExecutor until SIGINT /
    shutdown, clean up.

    rclpy's MultiThreadedExecutor is not used: it costs milliseconds of GIL time per callback and fell seconds
    behind the station's ~250 messages/s. After the node is built, everything allocated so far (imports, model)
    is moved to the permanent GC generation (``gc.freeze``): a full collection over it held the GIL for 10 ms
    (measured, policy_server's imports and model, idle machine), which a 50 Hz tick thread would wait for.

    A configuration error (``config_errors``, plus StationConfigError) is printed as one line naming the node
    and returns exit code 2 instead of a traceback; SIGINT returns 0.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from recap_ros.station import StationConfigError

    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        gc.collect()
        gc.freeze()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (StationConfigError, *config_errors) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
