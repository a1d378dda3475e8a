"""Where asset values (stage outcomes, the history table) are stored: local files by default,
S3 through dagster-aws when MLCI_S3_BUCKET is set. Credentials come from the standard AWS
environment variables, never from configuration."""

import os

import dagster as dg
from dagster_aws.s3 import S3PickleIOManager, S3Resource

S3_BUCKET_ENV = "MLCI_S3_BUCKET"


def io_manager() -> dg.ConfigurableIOManagerFactory | dg.ConfigurableIOManager:
    if not os.environ.get(S3_BUCKET_ENV):
        return dg.FilesystemIOManager()  # under $DAGSTER_HOME/storage
    return S3PickleIOManager(
        s3_resource=S3Resource(endpoint_url=os.environ.get("MLCI_S3_ENDPOINT_URL") or None),
        s3_bucket=dg.EnvVar(S3_BUCKET_ENV),
        s3_prefix=os.environ.get("MLCI_S3_PREFIX", "mlci"),
    )
