"""A load-balancing proxy in front of many api_servers (`lmkit serve proxy`)."""
