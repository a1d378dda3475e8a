"""The Spark History Server (the Spark web UI of finished applications) of one sandbox, on
127.0.0.1:--port, reading event logs from --events; exec'd, so it stays in this service's
process group."""

import argparse
import os
from pathlib import Path

import pyspark


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=Path, required=True)
    args = parser.parse_args()
    events = args.events.resolve()
    events.mkdir(parents=True, exist_ok=True)
    spark_home = Path(pyspark.__file__).parent
    os.environ.update({
        "SPARK_HOME": str(spark_home),
        "SPARK_LOCAL_IP": "127.0.0.1",  # the web UI binds here, not on every interface
        "SPARK_LOCAL_HOSTNAME": "localhost",
        "SPARK_DAEMON_MEMORY": "256m",
        "SPARK_HISTORY_OPTS": " ".join([
            f"-Dspark.history.fs.logDirectory=file://{events}",
            f"-Dspark.history.ui.port={args.port}",
            "-Dspark.history.fs.update.interval=1s",
            f"-Djava.io.tmpdir={events.parent}",
        ]),
    })
    spark_class = str(spark_home / "bin" / "spark-class")
    os.execv(spark_class, [spark_class, "org.apache.spark.deploy.history.HistoryServer"])


if __name__ == "__main__":
    main()
