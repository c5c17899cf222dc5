"""More than one engine behind one endpoint, on Ray Serve (imported only with ``--replicas``)."""
