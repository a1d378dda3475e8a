"""python-train: trains a scikit-learn classifier and logs its params, metrics and model to the
MLflow tracking server at MLFLOW_TRACKING_URI; prints run_id=... and experiment_id=...

Fails (exit 1) when the model is worse than --min-accuracy: the product check of this test.
"""

import argparse
import os

import mlflow
import mlflow.sklearn
import sklearn
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

# The forest's hyperparameters, logged as the run's params (the model tests read them here).
PARAMS = {"n_estimators": 50, "max_depth": 6, "random_state": 0}


def held_out_split() -> list:
    """x_train, x_test, y_train, y_test: the breast cancer data set (ships with scikit-learn: no
    download), a quarter held out, the same quarter every time: the model tests score the
    logged model on it."""
    x, y = load_breast_cancer(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="python-train")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args()

    x_train, x_test, y_train, y_test = held_out_split()
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(tags={"mlci.sandbox": os.environ.get("MLCI_SANDBOX_ID", "")}) as run:
        model = RandomForestClassifier(**PARAMS, n_jobs=1).fit(x_train, y_train)
        predicted = model.predict(x_test)
        metrics = {"accuracy": accuracy_score(y_test, predicted),
                   "f1": f1_score(y_test, predicted)}
        mlflow.log_params(PARAMS)
        mlflow.log_metrics(metrics)
        # Explicit requirements: MLflow would otherwise re-import the model in a subprocess.
        # The model is ours, so its tree type may be loaded back when MLflow checks the file.
        mlflow.sklearn.log_model(model, name="model",
                                 pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                                 skops_trusted_types=["sklearn.tree._tree.Tree"])
    print(f"metrics: {metrics}")
    print(f"accuracy={metrics['accuracy']:.4f}")
    print(f"experiment_id={run.info.experiment_id}")
    print(f"run_id={run.info.run_id}")
    if metrics["accuracy"] < args.min_accuracy:
        raise SystemExit(f"accuracy {metrics['accuracy']:.3f} < {args.min_accuracy}")


if __name__ == "__main__":
    main()
