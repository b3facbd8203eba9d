"""Reports: figures and tables summarising attack and defense runs."""
