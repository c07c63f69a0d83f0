"""Puts tests/ on sys.path (pytest's default import mode adds a conftest's folder), so unit and
integration tests share the modules kept here: tracker_stores (reading back what the experiment
trackers wrote)."""
