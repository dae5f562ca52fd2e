"""``python -m pipeline.register --model runs:/RUN_ID/model --name NAME``: a final model a job already logged,
registered after the fact (a job without ``tracking.register_as``, or one whose registration failed), by the
same function the job uses (``pipeline.tracking.register_final_model``)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from core.redact import install_redaction, redact_value
from pipeline.tracking import (
    MODEL_ARTIFACT_PATH,
    RegistryError,
    alias_problem,
    register_final_model,
    registry_name_problem,
)

_RUN_REF = re.compile(rf"runs:/(?P<run>[0-9a-f]+)(?:/{MODEL_ARTIFACT_PATH})?/?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.register",
        description="Register the final model of a training job's MLflow run in the MLflow Model Registry, as "
                    "tracking.register_as does at the end of a job; then models:/NAME/VERSION and models:/NAME@ALIAS "
                    "name it wherever a model reference is taken.")
    parser.add_argument("--model", required=True, help=f"runs:/RUN_ID/{MODEL_ARTIFACT_PATH}: the run whose final model "
                        "is registered (a job logs it there)")
    parser.add_argument("--name", required=True, help="registered model name (created if new)")
    parser.add_argument("--alias", default="", help="alias to point at the version, e.g. candidate")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the run (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    install_redaction()
    match = _RUN_REF.fullmatch(args.model.strip())
    if match is None:
        parser.error(f"--model {redact_value(args.model)!r}: expected runs:/RUN_ID/{MODEL_ARTIFACT_PATH}")
    for flag, value, why in (("--name", args.name, registry_name_problem(args.name)),
                             ("--alias", args.alias, alias_problem(args.alias) if args.alias else None)):
        if why:
            parser.error(f"{flag} {value!r} {why}")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        parser.error("no MLflow store: give --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        registered = register_final_model(uri, match["run"], args.name, args.alias)
    except RegistryError as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 1
    print(f"registered {registered.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
