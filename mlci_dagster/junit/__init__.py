"""JUnit XML: test reports read from the pipelines, and results written for CI systems."""
