"""spark-features: a Spark job (local[2], in this process's JVM) that computes per-customer
features from synthetic transactions, writes them as Parquet, logs the run to MLflow at
MLFLOW_TRACKING_URI and its event log for the History Server; waits until the History Server
shows the application, then prints run_id=..., experiment_id=... and app_id=..."""

import argparse
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow


def wait_for_history(history_url: str, app_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"{history_url}/api/v1/applications/{app_id}"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                attempts = json.loads(response.read()).get("attempts", [])
                if attempts and attempts[-1].get("completed"):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the History Server at {history_url} never listed {app_id}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=Path, required=True, help="the event log directory")
    parser.add_argument("--history", default="",
                        help="the History Server URL to wait for (none: do not wait)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--experiment", default="spark-features")
    args = parser.parse_args()
    args.events.mkdir(parents=True, exist_ok=True)

    work = Path.cwd()
    scratch = work / "spark-tmp"
    scratch.mkdir(exist_ok=True)
    # Spark's JVM and PySpark's own temporary files go into the sandbox, not /tmp.
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    os.environ["JAVA_TOOL_OPTIONS"] = f"-Djava.io.tmpdir={scratch}"
    # Loopback only: no lookup of the machine's name (slow where no DNS answers).
    os.environ.update(SPARK_LOCAL_IP="127.0.0.1", SPARK_LOCAL_HOSTNAME="localhost")

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    spark = (
        SparkSession.builder.master("local[2]").appName("mlci-spark-features")
        .config("spark.driver.memory", "512m")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")  # the History Server is the UI under test
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", f"file://{args.events.resolve()}")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.local.dir", str(scratch))
        .getOrCreate()
    )
    app_id = spark.sparkContext.applicationId
    transactions = spark.range(args.rows).select(
        (F.col("id") % 1000).alias("customer"),
        (F.col("id") % 10).alias("segment"),
        (F.rand(seed=7) * 200).alias("amount"),
        (F.floor(F.rand(seed=11) * 90)).cast("int").alias("day"),
    )
    features = transactions.groupBy("segment", "customer").agg(
        F.count("*").alias("n_tx"),
        F.sum("amount").alias("total"),
        F.avg("amount").alias("mean_amount"),
        F.stddev("amount").alias("std_amount"),
        F.countDistinct("day").alias("active_days"),
    ).withColumn("spend_rank", F.dense_rank().over(
        Window.partitionBy("segment").orderBy(F.desc("total"))))
    out = work / "features.parquet"
    features.write.mode("overwrite").parquet(str(out))
    stored = spark.read.parquet(str(out))
    summary = stored.agg(F.count("*").alias("rows"), F.avg("mean_amount").alias("mean"),
                         F.sum(F.col("std_amount").isNull().cast("int")).alias("nulls")).first()
    schema = stored.schema.jsonValue()
    spark.stop()  # completes the event log, so the History Server can list the application

    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(tags={"spark.app_id": app_id}) as run:
        mlflow.log_params({"rows": args.rows, "master": "local[2]",
                           "features": len(schema["fields"])})
        mlflow.log_metrics({"feature_rows": summary["rows"], "mean_amount": summary["mean"],
                            "null_std": summary["nulls"]})
        mlflow.log_dict(schema, "features_schema.json")
    if summary["rows"] != 1000 or summary["nulls"]:
        raise SystemExit(f"unexpected features: {summary}")
    if args.history:
        wait_for_history(args.history, app_id, timeout_s=60)
    print(f"features: {summary.asDict()}")
    print(f"app_id={app_id}")
    print(f"experiment_id={run.info.experiment_id}")
    print(f"run_id={run.info.run_id}")


if __name__ == "__main__":
    main()
