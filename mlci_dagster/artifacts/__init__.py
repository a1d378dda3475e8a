"""Evidence off the machine (Dagster-free): the artifact store a run's logs, debug bundle,
screenshots and test reports are uploaded to, and what of a run is uploaded."""
