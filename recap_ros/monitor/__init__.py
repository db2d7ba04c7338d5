"""Live monitoring of a running station (ROS-free): the value function's estimate and its drop alerts."""
