"""The assets whose events are written outside any run: what CI reports (a pull request's
label, an image it pushed) and what the sensors observe (commit summaries, qualified releases,
failure signatures, the janitor's sweeps, evidence uploaded late). Defined here, in the Dagster
layer's assets; the sensors that write them import them."""

from __future__ import annotations

import dagster as dg

from mlci_dagster.event_log import RUN_ARTIFACTS

PULL_REQUEST_LABEL = dg.AssetKey("pull_request_label")
COMMIT_SUMMARY = dg.AssetKey("commit_summary")
RELEASE_QUALIFICATION = dg.AssetKey("release_qualification")
PUSHED_IMAGE = dg.AssetKey("pushed_image")

pull_request_label = dg.AssetSpec(
    PULL_REQUEST_LABEL, group_name="commits", kinds={"github"},
    description="A label put on a pull request: one materialization per label event, with "
                "metadata sha, label and pr, or github_event (a pull_request webhook payload).")
commit_summary = dg.AssetSpec(
    COMMIT_SUMMARY, group_name="commits", kinds={"github"},
    description="One observation per state (pending, success, failure) of a SHA's run set in "
                "a tier: its partitions, their status, failing stage and run link.")
release_qualification = dg.AssetSpec(
    RELEASE_QUALIFICATION, group_name="commits", kinds={"github"},
    description="One observation per SHA whose nightly run set fully passed: a qualified "
                "release candidate.")
pushed_image = dg.AssetSpec(
    PUSHED_IMAGE, group_name="images", kinds={"docker"},
    description="An image a CI build pushed: one materialization per push, with metadata "
                "image_ref (the tag reference configs name) and image_digest (sha256:...).",
)
SIGNATURES_ASSET = dg.AssetSpec(
    "failure_signatures", group_name="operations", kinds={"python"},
    description="One observation per notifier tick that saw a failure signature appear, spread "
                "or resolve: its partitions, and a machine-generated hypothesis when a root-cause "
                "analyzer is configured.")
JANITOR_ASSET = dg.AssetSpec(
    "sandbox_janitor", group_name="operations", kinds={"python"},
    description="One observation per janitor sweep that reaped sandboxes, listing them.",
)
run_artifacts = dg.AssetSpec(
    RUN_ARTIFACTS, group_name="operations", kinds={"s3"},
    description="One observation per run whose evidence reached the artifact store after the "
                "run (the artifact_upload sensor's retries): its run id and partition, each "
                "piece stored (key, size, sha256, URL), those still pending, those gone.")
