"""What an export starts from: any model reference (``pipeline.model_ref``), turned into the network it
names, and the error every serving refusal raises (``ServingError``).

The reference is resolved the same way training's ``model.init_from``, evaluation and prediction resolve
it: a final model folder, a checkpoint file or folder (local or s3://), ``runs:/``, ``models:/NAME/VERSION``
or ``models:/NAME@ALIAS``. A reference that does not record its network (a bare checkpoint file, a DCP
checkpoint) is built from the experiment config given with it.
"""

from __future__ import annotations

from core.errors import ConfigError


class ServingError(ValueError):
    """A problem the user can fix (a bad model reference, a model/data mismatch, an op that does not
    export), reported as one line before or instead of the export."""


def load_model(ref: str, config: str | None = None, tracking_uri: str | None = None,
               s3_endpoint_url: str | None = None, overrides: list[str] | None = None):
    """``model_ref.InferenceModel`` for ``ref`` (eval mode, fp32, CPU); ``config``: the experiment YAML whose
    ``model:`` section describes the network when the reference does not (its class count must be set
    there then: a bare checkpoint names no classes), with ``key=value`` ``overrides`` (prediction takes them
    as training does). Refusals are ``ServingError`` in one line."""
    from pipeline.model_ref import ModelRefError, load_for_inference

    model_cfg = None
    if config:
        from pipeline.config import build_model_config, load_config  # the YAML schema: only when asked for

        try:
            exp = load_config(config, overrides)
            if exp.model.num_classes is not None:
                model_cfg = build_model_config(exp.model)
        except ConfigError as err:
            raise ServingError(str(err)) from None
    try:
        return load_for_inference(ref, model_cfg, tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url,
                                  compare=False)  # the data recipe is checked against the network by spec.py
    except ModelRefError as err:
        raise ServingError(str(err).replace("give --config with the experiment", "give --config with an "
                                            "experiment that sets model.num_classes and")) from None
