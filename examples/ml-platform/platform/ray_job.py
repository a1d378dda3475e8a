"""ray-train: a Ray job (submitted through the Jobs API) that runs a small hyperparameter search
as Ray tasks and logs the best trial to MLflow at MLFLOW_TRACKING_URI; prints run_id=...

--fail makes one trial raise, so the job ends FAILED (the harness's failure example).
"""

import argparse

import mlflow
import ray
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@ray.remote(num_cpus=1)
def trial(c: float, fail: bool) -> dict:
    if fail:
        raise ValueError(f"planted failure in the trial with C={c}")
    x, y = load_wine(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
    return {"C": c, "cv_accuracy": float(cross_val_score(model, x, y, cv=3).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="ray-train")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()

    ray.init()  # the job's cluster (RAY_ADDRESS, set by the Jobs API)
    grid = [0.01, 0.1, 1.0, 10.0]
    results = ray.get([trial.remote(c, args.fail and i == 2) for i, c in enumerate(grid)])
    best = max(results, key=lambda r: r["cv_accuracy"])
    print(f"trials: {results}")
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(tags={"ray.trials": str(len(results))}) as run:
        mlflow.log_params({"C": best["C"], "trials": len(results)})
        mlflow.log_metric("cv_accuracy", best["cv_accuracy"])
        for i, result in enumerate(results):
            mlflow.log_metric("trial_cv_accuracy", result["cv_accuracy"], step=i)
    print(f"experiment_id={run.info.experiment_id}")
    print(f"run_id={run.info.run_id}")


if __name__ == "__main__":
    main()
