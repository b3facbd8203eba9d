"""Ray: the bank job on a Ray Train worker group, the local Ray instance, the Tune sweep."""
