"""How old a message is: the one staleness rule of every command and observation path (ROS-free).

A message counts as taken at its header stamp or at its receive time, whichever is older. So a message that
was delayed ages from its stamp, and a sender whose clock runs ahead (stamps in the future) cannot make a
message look fresh: it ages from its receive time. An unstamped message (stamp 0, or a type without a header
such as Float64MultiArray) ages from its receive time. Used by the teleop mux (inputs and joint states) and by
the policy server (joint states and camera frames).
"""
from __future__ import annotations


def taken_ns(stamp_ns: int, received_ns: int) -> int:
    """When a message counts as taken, on the ROS clock: ``min(stamp, receive time)``; the receive time when
    the message carries no stamp (``stamp_ns <= 0``)."""
    return received_ns if stamp_ns <= 0 else min(stamp_ns, received_ns)


def taken_s(stamp_ns: int, received_ns: int, received_s: float) -> float:
    """:func:`taken_ns` on another clock (e.g. monotonic seconds): the receive time on that clock,
    ``received_s``, moved back by as much as the stamp predates the receive time on the ROS clock."""
    return received_s - (received_ns - taken_ns(stamp_ns, received_ns)) * 1e-9
