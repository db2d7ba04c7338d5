"""ROS-free control algorithms: chunk stitching, mux arbitration, CFG β guard and back-off."""
