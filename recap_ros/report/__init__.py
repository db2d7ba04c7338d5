"""recap-report: a recorded session (episode bags or a dataset) as an HTML page with PNG plots."""
